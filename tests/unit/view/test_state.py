"""The web view's state on its own: revisions as readers show them, badges that age,
deltas that carry only what changed, and every collection bounded."""

from __future__ import annotations

import dataclasses
import json

from streamproc.testing import MS, PREDICTIONS_T0, S, prediction
from streamproc.view.server import encode_json
from streamproc.view.state import (
    MASK_BITS,
    MAX_MARKS,
    QUIET_NS,
    WORDS_CHARS,
    DeadLetterBook,
    FrameInfo,
    Presence,
    ViewState,
)

NOW = PREDICTIONS_T0 + 10 * S
HISTORY = 120 * S


def revision(sid: str, hop: int, label: str, rev: int, final: bool, **changes):
    return dataclasses.replace(prediction(sid, hop, label), rev=rev, final=final, **changes)


def test_a_window_shows_its_latest_revision_and_copies_add_nothing() -> None:
    st = ViewState(HISTORY)
    assert st.on_prediction(revision("cam", 0, "three", 0, False), NOW)
    tile = st.take_delta(NOW)["streams"]["cam"]["tile"]
    assert (tile["label"], tile["tag"], tile["final"]) == ("three", "P", False)
    # the final replaces it; a copy of either, or the provisional again, adds nothing
    assert st.on_prediction(revision("cam", 0, "eight", 1, True), NOW)
    assert not st.on_prediction(revision("cam", 0, "eight", 1, True), NOW)
    assert not st.on_prediction(revision("cam", 0, "three", 0, False), NOW)
    delta = st.take_delta(NOW)
    assert delta["streams"]["cam"]["tile"]["label"] == "eight"
    assert delta["streams"]["cam"]["tile"]["tag"] == "F"
    (entry,) = delta["streams"]["cam"]["windows"]
    assert entry[2:6] == ["eight", 0.9, 1, 1]
    assert st.take_delta(NOW) is None  # nothing new since


def test_the_tile_follows_the_newest_window_while_finals_of_older_ones_fill_the_timeline(
        ) -> None:
    st = ViewState(HISTORY)
    st.on_prediction(revision("cam", 0, "one", 0, False), NOW)
    st.on_prediction(revision("cam", 1, "two", 0, False), NOW)
    st.take_delta(NOW)
    st.on_prediction(revision("cam", 0, "five", 1, True), NOW)  # a final, seconds later
    delta = st.take_delta(NOW)
    assert "tile" not in delta["streams"]["cam"]  # still showing window 1, provisional
    assert delta["streams"]["cam"]["windows"][0][2] == "five"
    assert st.streams["cam"].current.label == "two"
    assert [e.label for e in st.streams["cam"].windows.values()] == ["five", "two"]


def test_badges_say_masked_present_quiet_or_absent() -> None:
    st = ViewState(HISTORY)
    st.on_media("cam", "video", NOW)
    st.on_media("cam", "audio", NOW)
    assert st.streams["cam"].badges(NOW) == {"video": "present", "audio": "present",
                                             "text": "absent"}
    p = prediction("cam", 0)
    p.modalities["missing"] = ["audio"]
    st.on_prediction(p, NOW)
    assert st.streams["cam"].badges(NOW)["audio"] == Presence.MASKED
    assert st.streams["cam"].badges(NOW)["text"] == Presence.PRESENT  # the model had it
    later = NOW + QUIET_NS + 1
    assert st.streams["cam"].badges(later)["video"] == Presence.QUIET
    # a badge that ages is sent without any new record
    st.take_delta(NOW)
    assert st.take_delta(later)["streams"]["cam"]["tile"]["badges"]["video"] == "quiet"


def test_masked_modalities_are_bits_of_each_timeline_entry() -> None:
    st = ViewState(HISTORY)
    p = prediction("cam", 0)
    p.modalities["missing"] = ["video", "text"]
    st.on_prediction(p, NOW)
    (entry,) = st.streams["cam"].windows.values()
    assert entry.missing == MASK_BITS["video"] | MASK_BITS["text"]


def test_windows_are_kept_for_the_history_only_and_at_most_max_windows() -> None:
    st = ViewState(10 * S, max_windows=50)
    for hop in range(100):  # 50 s of windows every 0.5 s
        st.on_prediction(prediction("cam", hop), NOW)
    starts = sorted(st.streams["cam"].windows)
    assert starts[-1] - starts[0] <= 10 * S
    assert len(starts) <= 50
    # a window older than the history arriving late is not taken
    assert not st.on_prediction(revision("cam", 0, "x", 1, True), NOW)
    tiny = ViewState(HISTORY, max_windows=20)
    for hop in range(60):
        tiny.on_prediction(prediction("cam", hop), NOW)
    assert len(tiny.streams["cam"].windows) == 20


def test_streams_past_the_cap_drop_the_one_updated_least_recently() -> None:
    st = ViewState(HISTORY, max_streams=3)
    for i, sid in enumerate(("a", "b", "c")):
        st.on_media(sid, "video", NOW + i)
    st.take_delta(NOW)
    st.on_media("a", "video", NOW + 10)  # a is fresh again; b is now the stalest
    st.on_media("d", "video", NOW + 11)
    assert set(st.streams) == {"a", "c", "d"}
    assert st.take_delta(NOW + 12)["removed"] == ["b"]


def test_dead_letters_are_grouped_by_kind_and_reason_shape_and_bounded() -> None:
    book = DeadLetterBook(max_groups=3)
    book.add("oversize", "value is 9000000 bytes, over the 8388608-byte limit", "cam", "p.video", 1)
    book.add("oversize", "value is 9100000 bytes, over the 8388608-byte limit", "cam", "p.video", 2)
    book.add("late", "every window of it had already closed", "cam2", "p.audio", 3)
    panel = book.to_json()
    assert panel["total"] == 3 and panel["by_kind"] == {"oversize": 2, "late": 1}
    assert [(g["kind"], g["count"]) for g in panel["groups"]] == [("late", 1), ("oversize", 2)]
    assert panel["groups"][1]["reason"].startswith("value is 9100000")  # the newest example
    for i in range(5):
        book.add("decode", f"reason {'x' * i}", "cam", "p.text", 10 + i)
    assert len(book.groups) == 3 and book.folded == 5 and book.total == 8


def test_dead_letters_mark_their_stream_timeline_and_unkeyed_ones_are_counted() -> None:
    st = ViewState(HISTORY)
    st.on_dead_letter("cam", "decode", "JPEG", "p.video", NOW - S, NOW)
    st.on_dead_letter(None, "decode", "record has no key", "p.video", None, NOW)
    delta = st.take_delta(NOW)
    assert delta["streams"]["cam"]["marks"] == [[(NOW - S) // MS, "decode"]]
    assert delta["streams"]["cam"]["tile"]["dead"] == 1
    assert delta["deadletters"]["total"] == 2
    for i in range(MAX_MARKS + 50):
        st.on_dead_letter("cam", "late", "late", "p.video", NOW + i, NOW)
    assert len(st.streams["cam"].marks) == MAX_MARKS
    assert len(st.take_delta(NOW)["streams"]["cam"]["marks"]) == MAX_MARKS


def test_words_are_the_newest_transcript_revised_partials_replaced() -> None:
    st = ViewState(HISTORY)
    st.on_text("cam", NOW, NOW + S, "seven", NOW)
    st.on_text("cam", NOW + S, NOW + 2 * S, "thr", NOW)
    st.on_text("cam", NOW + S, NOW + 2 * S, "three", NOW)  # the partial, revised
    assert st.streams["cam"].words() == "seven three"
    for i in range(40):
        st.on_text("cam", NOW + (3 + i) * S, NOW + (4 + i) * S, f"word{i}", NOW)
    words = st.streams["cam"].words()
    assert len(words) <= WORDS_CHARS + 1 and words.endswith("word39")


def test_snapshot_and_deltas_are_strict_json_and_frames_versioned() -> None:
    st = ViewState(HISTORY)
    p = prediction("cam", 0)
    p.scores["7"] = float("nan")
    p.latency_ms["total"] = float("inf")
    st.on_prediction(p, NOW)
    st.on_frame("cam", FrameInfo(3, 320, 240, NOW), NOW)
    st.on_frame("gone", FrameInfo(1, 320, 240, NOW), NOW)  # forgotten stream: ignored
    snap = json.loads(encode_json(st.snapshot(NOW, {"prefix": "p"})))
    tile = snap["streams"]["cam"]["tile"]
    assert tile["score"] is None and tile["latency_ms"] is None
    assert tile["frame"] == {"v": 3, "w": 320, "h": 240, "ts_ms": NOW // MS}
    assert snap["labels"] == ["7", "other"] and "gone" not in snap["streams"]
    assert json.loads(encode_json(st.take_delta(NOW)))["type"] == "delta"
