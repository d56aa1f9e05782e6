"""What `streamproc topics` reports about topic states (no broker: the states are given)."""

from __future__ import annotations

from streamproc.config import Settings
from streamproc.topics import TopicState, problems

S = Settings(topic_prefix="mix")


def states(video: int, audio: int, text: int, outputs: int = 4) -> list[TopicState]:
    counts = [video, audio, text, outputs, outputs]
    return [TopicState(n, c, S.max_message_bytes) for n, c in zip(S.all_topics, counts,
                                                                    strict=True)]


def test_inputs_that_differ_name_the_odd_one_and_outputs_are_held_to_the_rest() -> None:
    found = problems(S, states(4, 6, 4))
    assert len(found) == 1, found
    assert found[0].startswith("input topics are not co-partitioned: partition counts differ "
                               "(mix.video=4, mix.audio=6, mix.text=4: mix.audio differs); ")
    found = problems(S, states(4, 6, 4, outputs=6))
    assert found[1:] == ["mix.predictions has 6 partitions, mix.video and mix.text have 4",
                         "mix.deadletter has 6 partitions, mix.video and mix.text have 4"]
    # every count different: no input is "the odd one", and outputs have nothing to match
    [found_one] = problems(S, states(2, 4, 6))
    assert "(mix.video=2, mix.audio=4, mix.text=6); " in found_one


def test_co_partitioned_inputs_hold_the_outputs_to_their_count() -> None:
    assert problems(S, states(4, 4, 4)) == []
    assert problems(S, states(4, 4, 4, outputs=3)) == [
        "mix.predictions has 3 partitions, the inputs have 4",
        "mix.deadletter has 3 partitions, the inputs have 4"]


def test_a_count_asked_for_is_one_existing_topics_must_have() -> None:
    assert problems(S, states(4, 4, 4)) == []  # none asked: any shared count will do
    assert problems(S, states(8, 8, 8, outputs=8), partitions=8) == []
    [found] = problems(S, states(4, 4, 4), partitions=8)
    assert found.startswith("mix.video, mix.audio, mix.text, mix.predictions and "
                            "mix.deadletter have 4 partitions, not the 8 asked for "
                            "(--partitions); `topics create` never changes an existing topic")
    found = problems(S, states(8, 4, 8, outputs=8), partitions=8)
    assert found[0].startswith("mix.audio has 4 partitions, not the 8 asked for")
    assert "mix.audio differs" in found[1]
