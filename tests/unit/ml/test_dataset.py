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
    ("stream_id,start_s,end_s,label\ncam,0,1,a\ncam,x,2,b\n", ":3: start and end must be"),
    ("stream_id,start,end,label\ncam,2026-11-30T09:00:00,2026-11-30T09:01:00,a\n",
     ":2: a date and time needs its time zone"),
    ("stream_id,start,end,label\ncam,0,2026-11-30T09:01:00Z,a\n", ":2: start and end must both"),
    ("stream_id,start_s,end_s,label\ncam,2,1,a\n", ":2: need a stream id"),
    ("stream_id,start_s,end_s,label\n\n", "no label spans"),
])
def test_bad_labels_files_name_the_line(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(DatasetError, match=error):
        read_labels(tmp_path / "l.csv")


def test_labels_file_with_absolute_times(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text(
        "stream_id,start,end,label\n"
        "door,2026-11-30T09:15:00Z,2026-11-30T09:15:10.5Z,speaking\n"
        "door,2026-11-30T10:15:10.5+01:00,2026-11-30T09:16:00Z,silent\n"
        "cam1,0,2,seven\n")
    spans = read_labels(tmp_path / "l.csv")
    t = 1_796_030_100 * NS_PER_S  # 2026-11-30T09:15:00Z
    origin = 5 * NS_PER_S  # relative spans only
    assert spans.label_for("door", t, t + NS_PER_S, origin) == "speaking"
    assert spans.label_for("door", t + 11 * NS_PER_S, t + 12 * NS_PER_S, origin) == "silent"
    assert spans.label_for("door", t + 60 * NS_PER_S, t + 61 * NS_PER_S, origin) is None
    assert spans.label_for("cam1", origin, origin + NS_PER_S, origin) == "seven"
    spans.write(tmp_path / "back.csv")
    assert read_labels(tmp_path / "back.csv") == spans
    assert "2026-11-30T09:15:10.500Z" in (tmp_path / "back.csv").read_text()


def _at(sid: str, start_s: float, seed: int = 0) -> Window:
    w = _window(1, np.random.default_rng(seed))
    start = round(start_s * NS_PER_S)
    return Window(sid, start, start + NS_PER_S, w.frames, w.frame_count, w.audio,
                  w.audio_mask, w.sample_rate, w.segments, w.present, w.quality, w.provenance)


WINDOW = {"window_ms": 1000, "hop_ms": 500, "frames_per_window": 8, "sample_rate": 16000}


def test_append_adds_windows_once_and_keeps_the_earlier_ones(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", labels=["a", "b"], window=WINDOW,
                       source={"run": 1}) as w:
        for i in range(5):
            assert w.add(_at("cam", i * 0.5), "a")
    with DatasetWriter(tmp_path / "ds", labels=["b"], window=WINDOW, source={"run": 2},
                       append=True, shard_size=2) as w:
        assert w.count == 5 and w.labels == ["a", "b"]
        # the same span again (a second recording of the same topics): stored once, first label
        assert not w.add(_at("cam", 1.0), "b")
        for i in range(5, 9):
            assert w.add(_at("cam", i * 0.5), "b")
        assert w.add(_at("cam2", 0.0), "b")
        assert w.skipped == 1
    ds = Dataset(tmp_path / "ds")
    keys = [(e.window.stream_id, e.window.start_ns, e.label) for e in ds.load()]
    assert len(keys) == len({k[:2] for k in keys}) == 10
    assert (("cam", NS_PER_S, "a")) in keys
    assert ds.manifest["label_counts"] == {"a": 5, "b": 5}
    assert ds.splits == {"train": 10}
    runs = ds.manifest["recordings"]
    assert [r["run"] for r in runs] == [1, 2]
    assert [r["windows_added"] for r in runs] == [5, 5] and runs[1]["windows_skipped_existing"] == 1
    assert all(r["complete"] for r in runs)
    assert len(ds.index()) == 10 and ds.index()[0] == ("cam", 0, NS_PER_S, "a", "train")


def test_append_checks_window_settings_and_labels(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", labels=["a", "b"], window=WINDOW) as w:
        w.add(_at("cam", 0), "a")
    with pytest.raises(DatasetError, match=r"cut with hop_ms=500.*cut them with hop_ms=250"):
        DatasetWriter(tmp_path / "ds", labels=["a"], window={**WINDOW, "hop_ms": 250},
                      append=True)
    with pytest.raises(DatasetError, match=r"labels \['c'\] are not among.*--add-labels"):
        DatasetWriter(tmp_path / "ds", labels=["a", "c"], window=WINDOW, append=True)
    with DatasetWriter(tmp_path / "ds", labels=["c", "a"], window=WINDOW, append=True,
                       add_labels=True) as w:
        assert w.labels == ["a", "b", "c"]
        w.add(_at("cam", 5), "c")
    assert Dataset(tmp_path / "ds").labels == ["a", "b", "c"]
    with pytest.raises(DatasetError, match="already holds a dataset; append"):
        DatasetWriter(tmp_path / "ds")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", window=WINDOW) as w:
        w.add(_at("cam", 0), "a")
        with pytest.raises(DatasetError, match="being written by another process"):
            DatasetWriter(tmp_path / "ds", window=WINDOW, append=True)
    DatasetWriter(tmp_path / "ds", window=WINDOW, append=True).close()


def test_a_crash_mid_recording_keeps_the_dataset_readable(tmp_path: Path) -> None:
    """A recording killed part way (here: its process ends without closing the writer,
    after two complete shards and while a third is half written) leaves the dataset with
    what was there before plus every complete shard; the next append cleans up."""
    import subprocess
    import sys
    import textwrap

    with DatasetWriter(tmp_path / "ds", labels=["a"], window=WINDOW) as w:
        for i in range(3):
            w.add(_at("cam", i), "a")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        import numpy as np
        from streamproc.ml import dataset
        from test_dataset import _at, WINDOW
        w = dataset.DatasetWriter({str(tmp_path / "ds")!r}, labels=["a"], window=WINDOW,
                                  append=True, shard_size=2)
        for i in range(4):
            w.add(_at("cam", 10 + i), "a")  # two shards, each followed by the manifest
        real = dataset._atomic_write
        def torn(path, data):
            if path.name.endswith(".json") and path.name.startswith("shard-"):
                path.with_name(path.name + ".tmp").write_bytes(data[:10])
                os._exit(9)  # killed while writing the third shard
            real(path, data)
        dataset._atomic_write = torn
        for i in range(4, 6):
            w.add(_at("cam", 10 + i), "a")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert list((tmp_path / "ds").glob("*.tmp"))  # the torn file is there...
    ds = Dataset(tmp_path / "ds")  # ...but not in the manifest
    assert len(ds.load()) == 7
    assert not ds.manifest["recordings"][-1]["complete"]
    with DatasetWriter(tmp_path / "ds", labels=["a"], window=WINDOW, append=True) as w:
        assert w.count == 7
        w.add(_at("cam", 20), "a")
    assert not list((tmp_path / "ds").glob("*.tmp"))
    assert len(Dataset(tmp_path / "ds").load()) == 8


def test_record_summary_reports_what_the_memory_cap_dropped() -> None:
    from streamproc.ml.recording import RecordStats

    assert "memory cap dropped" not in RecordStats(records=3).summary()
    text = RecordStats(records=3, capped_frames=40, capped_audio_s=2.5).summary()
    assert "the memory cap dropped 40 buffered frames and 2.5 s of buffered audio" in text
    assert "--max-buffer-frames" in text
