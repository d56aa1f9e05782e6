"""Other worker groups writing this group's predictions topic, found at start-up.

Two groups on one topic prefix both read every input and both publish predictions, so
readers get two sets of windows mixed; a worker reads the tail of the topic once before
it starts and warns about every other recent writer (docs/pipeline.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError

from streamproc import kafka
from streamproc.config import Settings
from streamproc.inference.predictions import prediction_headers
from streamproc.wire import codec as wire

#: A prediction from another worker group counts as recent (a group still writing) when
#: it was emitted less than this long ago.
RECENT_OTHER_GROUP_S = 600.0
#: Records read from the end of each predictions partition at start-up.
TAIL_RECORDS = 50


def other_groups(settings: Settings, model_info: Mapping[str, str], *,
                 now_ns: int | None = None, timeout_s: float = 10.0) -> list[str]:
    """Warnings about other worker groups writing this group's predictions topic.

    Reads the last :data:`TAIL_RECORDS` records of each partition (blocking: call it
    before the app starts, never on the event loop). A group other than
    ``settings.app_id`` that emitted a prediction in the last
    :data:`RECENT_OTHER_GROUP_S` seconds gets one line, saying how its model and window
    settings differ from ours.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    topic = settings.topic("predictions")
    mine = {k: v.decode("utf-8") for k, v in prediction_headers(settings, model_info)}
    seen: dict[str, dict[str, Any]] = {}
    try:
        _read_writers(settings, topic, mine["sp-app"], now_ns, timeout_s, seen)
    except KafkaError as e:  # a check, not a reason to stay down
        return [f"could not read the end of {topic} to look for other worker groups: {e!r}"]
    out = []
    for app, info in sorted(seen.items()):
        diffs = [f"{name} {info[h]!r} (this worker: {mine[h]!r})"
                 for h, name in (("sp-model", "model"), ("sp-window", "windows"))
                 if info[h] != mine[h]]
        what = ("; ".join(diffs) + ": readers get both groups' windows mixed, and where "
                "both publish the same window they keep whichever copy came first"
                if diffs else "with the same model and windows: every window is computed "
                "and published twice")
        out.append(f"predictions topic {topic} has {info['count']} prediction(s) from worker "
                   f"group {app!r} in the last {RECENT_OTHER_GROUP_S:.0f} s, {what}. Give "
                   "each group its own --topic-prefix, or stop the other group.")
    return out


def _read_writers(settings: Settings, topic: str, app_id: str, now_ns: int, timeout_s: float,
                  seen: dict[str, dict[str, Any]]) -> None:
    """Note the writers of the last records of every partition of ``topic``."""
    consumer = kafka.consumer(settings)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or ())]
        if not tps:
            return
        consumer.assign(tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(begin[tp], end[tp] - TAIL_RECORDS))
        deadline = time.monotonic() + timeout_s
        while (any(consumer.position(tp) < end[tp] for tp in tps)
               and time.monotonic() < deadline):
            for msgs in consumer.poll(timeout_ms=200).values():
                for m in msgs:
                    _note_writer(m, app_id, now_ns, seen)
    finally:
        consumer.close()


def _note_writer(m: Any, app_id: str, now_ns: int, seen: dict[str, dict[str, Any]]) -> None:
    """Remember the writer of one predictions record if it is another, recent group."""
    headers = {k: v for k, v in (m.headers or ())}
    app = headers.get("sp-app", b"").decode("utf-8", "replace")
    if not app or app == app_id:
        return
    try:
        pred = wire.decode_prediction(wire.KafkaRecord.from_client(m))
    except wire.WireError:
        return
    if now_ns - pred.emitted_at_ns > RECENT_OTHER_GROUP_S * 1e9:
        return
    info = seen.setdefault(app, {"count": 0})
    info["count"] += 1
    for h in ("sp-model", "sp-window"):
        info[h] = headers.get(h, b"").decode("utf-8", "replace")
