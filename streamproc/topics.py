"""Create and check streamproc's topics (kafka-python admin).

The three input topics must be co-partitioned (same partition count, same key
partitioner) so one worker owns every modality of a stream; predictions and dead
letters get the same count so a stream's outputs stay on "its" partition too.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streamproc import kafka
from streamproc.config import Settings
from streamproc.errors import UserError


class TopicError(UserError):
    """Topics are missing or not co-partitioned; the message lists every problem."""


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int | None  # None: the topic does not exist
    max_message_bytes: int | None
    # how far ahead of the broker's clock a record's timestamp may be (None: not known)
    timestamp_after_max_ms: int | None = None


def topic_configs(settings: Settings) -> dict[str, str]:
    """Per-topic settings streamproc relies on."""
    return {
        "max.message.bytes": str(settings.max_message_bytes),
        # event time is the producer's timestamp, never the broker's append time
        "message.timestamp.type": "CreateTime",
    }


def create_topics(settings: Settings) -> list[str]:
    """Create every missing streamproc topic; return the names created."""
    admin = kafka.admin(settings)
    created = []
    try:
        existing = set(admin.list_topics())
        for name in settings.all_topics:
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, settings.partitions,
                                              settings.replication_factor,
                                              topic_configs=topic_configs(settings))],
                                    # a topic is usable only once its leaders are in metadata
                                    wait_for_metadata=True)
                created.append(name)
            except TopicAlreadyExistsError:  # created concurrently by another worker
                pass
    finally:
        admin.close()
    return created


def describe(settings: Settings, names: tuple[str, ...] | None = None) -> list[TopicState]:
    names = names or settings.all_topics
    admin = kafka.admin(settings)
    try:
        existing = set(admin.list_topics())
        present = [n for n in names if n in existing]
        parts: dict[str, int] = {}
        if present:
            for t in admin.describe_topics(present):
                if t.get("error_code", 0) == 0:
                    parts[t["name"]] = len(t["partitions"])
        sizes: dict[str, int] = {}
        ahead: dict[str, int] = {}
        if present:
            res = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n) for n in present],
                config_filter="all")
            for name, conf in res.get("topic", {}).items():
                if "max.message.bytes" in conf:
                    sizes[name] = int(conf["max.message.bytes"]["value"])
                if "message.timestamp.after.max.ms" in conf:
                    ahead[name] = int(conf["message.timestamp.after.max.ms"]["value"])
    except KafkaError as e:
        raise TopicError(f"could not describe topics on {settings.bootstrap_servers}: {e}") from e
    finally:
        admin.close()
    return [TopicState(n, parts.get(n), sizes.get(n), ahead.get(n)) for n in names]


def problems(settings: Settings, states: list[TopicState],
             partitions: int | None = None) -> list[str]:
    """Every reason the topics cannot serve streamproc, in words a person can act on.

    ``partitions``: the count asked for (``--partitions`` given to ``streamproc topics``);
    existing topics with another count are then a problem too. None: any count will do
    as long as the topics agree (what workers and producers check).
    """
    out = []
    by_name = {s.name: s for s in states}
    missing = [s.name for s in states if s.partitions is None]
    if missing:
        out.append(f"missing topic(s): {', '.join(missing)} (run `streamproc topics create`)")
    if partitions is not None:
        other = [s for s in states if s.partitions is not None and s.partitions != partitions]
        for count in sorted({s.partitions for s in other if s.partitions is not None}):
            names = [s.name for s in other if s.partitions == count]
            out.append(
                f"{_and(names)} {'has' if len(names) == 1 else 'have'} {count} partitions, "
                f"not the {partitions} asked for (--partitions); `topics create` never "
                "changes an existing topic: recreate them, or add partitions with "
                "kafka-topics --alter (streams then move to other partitions)")
    counts = {n: c for n in settings.input_topics if (c := by_name[n].partitions) is not None}
    # the inputs' count: the one they share, else the one most of them have (None: a tie)
    ranked = collections.Counter(counts.values()).most_common()
    want = ranked[0][0] if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]) \
        else None
    if len(ranked) > 1:
        detail = ", ".join(f"{n}={c}" for n, c in counts.items())
        if want is not None:  # one of three differs
            detail += ": " + _and([n for n, c in counts.items() if c != want]) + " differs"
        out.append(
            f"input topics are not co-partitioned: partition counts differ ({detail}); one "
            "worker must own every modality of a stream, so give them the same count "
            "(add partitions with kafka-topics --alter, or recreate them)"
        )
    if want is not None:
        inputs = "the inputs have" if len(ranked) == 1 else \
            f"{_and([n for n, c in counts.items() if c == want])} have"
        for s in states:
            if s.name not in counts and s.partitions is not None and s.partitions != want:
                out.append(f"{s.name} has {s.partitions} partitions, {inputs} {want}")
    for s in states:
        if s.max_message_bytes is not None and s.max_message_bytes < settings.max_message_bytes:
            out.append(
                f"{s.name}: max.message.bytes={s.max_message_bytes} is below "
                f"max_message_bytes={settings.max_message_bytes}; large frames would be "
                "rejected (raise the topic setting or lower --max-message-bytes)"
            )
    return out


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_topics(settings: Settings, inputs_only: bool = False) -> list[TopicState]:
    """Raise TopicError listing every problem; return the topic states when all is well."""
    names = settings.input_topics if inputs_only else settings.all_topics
    states = describe(settings, names)
    found = problems(settings, states)
    if found:
        raise TopicError("topics are not ready:\n  - " + "\n  - ".join(found))
    return states
