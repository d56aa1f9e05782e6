"""Dataset directories (shards + manifest, no pickle) and labels files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamproc.align.aligner import Window
from streamproc.ml.dataset import (
    MANIFEST,
    Dataset,
    DatasetError,
    DatasetWriter,
    LabelSpan,
    LabelSpans,
    read_labels,
)
from streamproc.wire.codec import NS_PER_S, Source, TranscriptSegment, VideoFrame, Word


def _window(i: int, rng: np.random.Generator) -> Window:
    fmt = "png" if i % 3 == 0 else "jpeg"
    frames = [VideoFrame.from_image("cam", i * NS_PER_S + j, 10 * i + j,
                                    rng.integers(0, 255, (12, 20, 3), np.uint8), fmt)
              for j in range(i % 4)]
    audio = np.clip(rng.normal(0, 0.3, 16000), -1, 1).astype(np.float32)
    mask = np.ones(16000, bool)
    mask[i * 100:i * 100 + 777] = False
    audio[~mask] = 0
    words = (Word("wörd", i * NS_PER_S, i * NS_PER_S + 2), Word(str(i), i * NS_PER_S + 3,
                                                               i * NS_PER_S + 5))
    segs = [TranscriptSegment("cam", i, f"wörd {i}", i * NS_PER_S, i * NS_PER_S + 5, i % 2 == 0,
                              0.5 if i % 2 else None, "en",
                              words=words if i % 4 == 1 else None)] if i % 2 else []
    return Window("cam", i * NS_PER_S, (i + 1) * NS_PER_S, frames, len(frames) + 2, audio,
                  mask, 16000, segs, {"video": bool(frames), "audio": True, "text": bool(segs)},
                  {"closed_by": "watermark", "frames_dropped": 2},
                  {"video": [Source("t.video", 1, 100 + j) for j in range(len(frames))]})


def test_round_trip_across_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    wins = [_window(i, rng) for i in range(11)]
    with DatasetWriter(tmp_path / "ds", shard_size=4, source={"by": "test"},
                       window={"hop_ms": 500, "frames_per_window": 8}) as w:
        for i, win in enumerate(wins):
            w.add(win, ["a", "b", "c"][i % 3], "test" if i > 7 else "train", {"i": i})
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == 11 and ds.labels == ["a", "b", "c"]
    assert ds.splits == {"train": 8, "test": 3}
    assert ds.window == {"hop_ms": 500, "frames_per_window": 8, "window_ms": 1000,
                         "sample_rate": 16000}
    assert len(ds.manifest["shards"]) == 3  # 4 + 4 + 3
    got = ds.load()
    assert [e.info["i"] for e in got] == list(range(11))
    assert [e.info["i"] for e in ds.load("test")] == [8, 9, 10]
    for ex, win in zip(got, wins, strict=True):
        g = ex.window
        assert (g.stream_id, g.start_ns, g.end_ns, g.frame_count, g.sample_rate) == \
            (win.stream_id, win.start_ns, win.end_ns, win.frame_count, win.sample_rate)
        assert g.frames == win.frames  # bytes, times, seqs, formats, sizes
        assert np.array_equal(g.audio_mask, win.audio_mask)
        assert np.abs(g.audio - win.audio).max() <= 2 / 32768  # 16-bit PCM storage
        assert [(s.text, s.start_ns, s.end_ns, s.final, s.confidence, s.lang, s.seq, s.words)
                for s in g.segments] == [(s.text, s.start_ns, s.end_ns, s.final, s.confidence,
                                          s.lang, s.seq, s.words) for s in win.segments]
        assert g.text == win.text
        assert g.present == win.present and g.quality == win.quality
        assert g.provenance == win.provenance


def test_shards_hold_no_pickled_objects(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with DatasetWriter(tmp_path / "ds") as w:
        w.add(_window(5, rng), "x")
    with np.load(tmp_path / "ds" / "shard-00000.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_a_modified_shard_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with DatasetWriter(tmp_path / "ds") as w:
        w.add(_window(1, rng), "x")
    shard = tmp_path / "ds" / "shard-00000.json"
    shard.write_text(shard.read_text().replace('"x"', '"y"'))
    with pytest.raises(DatasetError, match="does not match the digest"):
        Dataset(tmp_path / "ds").load()


def test_writer_refuses_existing_dataset_and_unknown_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with DatasetWriter(tmp_path / "ds", labels=["a"]) as w:
        with pytest.raises(DatasetError, match="label 'b' is not one of"):
            w.add(_window(1, rng), "b")
        w.add(_window(1, rng), "a")
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetWriter(tmp_path / "ds")
    w2 = DatasetWriter(tmp_path / "ds", overwrite=True)
    w2.close()
    assert len(Dataset(tmp_path / "ds")) == 0


def test_mixed_window_shapes_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    a = _window(1, rng)
    b = Window("cam", 0, 2 * NS_PER_S, [], 0, np.zeros(32000, np.float32),
               np.ones(32000, bool), 16000, [], {"video": False, "audio": True, "text": False})
    with DatasetWriter(tmp_path / "ds") as w:
        w.add(a, "x")
        with pytest.raises(DatasetError, match="has shape"):
            w.add(b, "x")


def test_not_a_dataset_or_wrong_version(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a streamproc dataset"):
        Dataset(tmp_path)
    with DatasetWriter(tmp_path / "ds") as w:
        w.add(_window(1, np.random.default_rng(5)), "x")
    m = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    m["format_version"] = 9
    (tmp_path / "ds" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format version 9"):
        Dataset(tmp_path / "ds")


def test_labels_file_round_trip_and_overlap_rule(tmp_path: Path) -> None:
    spans = LabelSpans([LabelSpan("cam1", 0.0, 2.0, "seven"), LabelSpan("cam1", 2.0, 4.0, "two"),
                        LabelSpan("cam2", 0.5, 1.5, "one")])
    spans.write(tmp_path / "l.csv")
    back = read_labels(tmp_path / "l.csv")
    assert back == spans and back.labels == ["seven", "two", "one"]
    o = 10 * NS_PER_S  # stream origin
    s = NS_PER_S
    assert back.label_for("cam1", o, o + s, o) == "seven"  # wholly inside
    assert back.label_for("cam1", o + s, o + 2 * s, o) == "seven"
    assert back.label_for("cam1", o + 3 * s // 2, o + 5 * s // 2, o) is None  # half and half
    assert back.label_for("cam1", o + 7 * s // 4, o + 11 * s // 4, o) == "two"  # 75 % two
    assert back.label_for("cam1", o + 3 * s // 2, o + 5 * s // 2, o, min_overlap=0.5) in (
        "seven", "two")
    assert back.label_for("cam2", o + s // 2, o + 3 * s // 2, o) == "one"
    assert back.label_for("cam3", o, o + s, o) is None


@pytest.mark.parametrize("text, error", [
    ("", "header must be"),
    ("stream,start,end,label\n", "header must be"),
    ("stream_id,start_s,end_s,label\ncam,0,1\n", ":2: expected 4 fields"),
    ("stream_id,start_s,end_s,label\ncam,0,1,a\ncam,x,2,b\n", ":3: start_s and end_s must be"),
    ("stream_id,start_s,end_s,label\ncam,2,1,a\n", ":2: need a stream id"),
    ("stream_id,start_s,end_s,label\n\n", "no label spans"),
])
def test_bad_labels_files_name_the_line(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(DatasetError, match=error):
        read_labels(tmp_path / "l.csv")
