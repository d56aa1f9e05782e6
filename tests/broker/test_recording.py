"""`streamproc record` against the real broker: a replayed AV-Digits clip becomes a
labelled dataset; bad records are counted, not fatal."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamproc import kafka
from streamproc.capture.publisher import Publisher
from streamproc.capture.sources import replay
from streamproc.cli import main
from streamproc.config import Settings
from streamproc.ml import avdigits as av
from streamproc.ml.dataset import Dataset
from streamproc.ml.train import preprocess_for
from streamproc.models.preprocess import make_batch
from streamproc.wire.codec import NS_PER_S

pytestmark = pytest.mark.broker


def test_record_writes_labelled_windows_from_the_topics(
        topics: Settings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    settings = topics
    digits = [2, 8, 5]
    clip = av.write_clip(tmp_path / "clip", digits, stream_id="rec-1", cfg=av.PRESETS["tiny"],
                         cache_dir=tmp_path / "tts")
    hop = settings.hop_ms * 1_000_000
    origin = (time.time_ns() // hop) * hop - 60 * NS_PER_S  # hop-aligned, a minute ago
    with Publisher(settings) as pub:
        stats = replay(pub, "rec-1", clip.video, clip.audio, clip.transcript, realtime=False,
                       start_at_ns=origin)
    assert stats.frames == len(digits) * 30
    raw = kafka.producer(settings)
    raw.send(settings.topic("video"), key=b"rec-1", value=b"not a frame")  # no headers
    raw.flush()
    raw.close()

    out = tmp_path / "recorded"
    rc = main(["record", "--labels", str(clip.labels), "--out", str(out), "--idle-exit", "2",
               "--bootstrap-servers", settings.bootstrap_servers,
               "--topic-prefix", settings.topic_prefix])
    assert rc == 0
    err = capsys.readouterr().err
    assert "9 labelled and written" in err
    assert "1 undecodable" in err and "missing header sp-v" in err

    ds = Dataset(out)
    assert ds.labels == [av.LABELS[d] for d in digits]
    assert ds.window["frames_per_window"] == settings.frames_per_window
    examples = ds.load()
    assert len(examples) == 3 * len(digits)
    seg_ns = 2 * NS_PER_S
    for ex in examples:
        w = ex.window
        i, offset = divmod(w.start_ns - origin, seg_ns)
        assert offset in (0, NS_PER_S // 2, NS_PER_S)  # wholly inside digit i's span
        assert ex.label == av.LABELS[digits[i]]
        assert w.present["video"] and w.present["audio"]
        assert len(w.frames) == settings.frames_per_window and w.frame_count == 15
        assert w.provenance["video"][0].topic == settings.topic("video")
    # the recorded windows feed the same preprocessing as training
    batch = make_batch([e.window for e in examples], preprocess_for(ds))
    assert batch.present[:, :2].all()

    # a second run into the same directory is refused instead of mixing datasets
    rc = main(["record", "--labels", str(clip.labels), "--out", str(out), "--idle-exit", "1",
               "--bootstrap-servers", settings.bootstrap_servers,
               "--topic-prefix", settings.topic_prefix])
    assert rc == 2 and "already holds a dataset; append" in capsys.readouterr().err


def test_record_appends_across_recordings_without_doubling_windows(
        topics: Settings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two recordings into one dataset: the second reads the topics from the start again
    (the first stream's windows are skipped as already there) and adds the new stream;
    labels in absolute times work beside relative ones; other window settings are
    refused."""
    settings = topics
    origin = (time.time_ns() // NS_PER_S) * NS_PER_S - 120 * NS_PER_S  # whole seconds
    clips = {sid: av.write_clip(tmp_path / sid, digits, stream_id=sid,
                                cfg=av.PRESETS["tiny"], cache_dir=tmp_path / "tts")
             for sid, digits in (("rec-a", [1, 4]), ("rec-b", [4, 7, 1]))}
    args = ["--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix",
            settings.topic_prefix, "--idle-exit", "2"]
    out = tmp_path / "recorded"

    def replay_clip(sid: str, at: int) -> None:
        c = clips[sid]
        with Publisher(settings) as pub:
            replay(pub, sid, c.video, c.audio, c.transcript, realtime=False, start_at_ns=at)

    replay_clip("rec-a", origin)
    assert main(["record", "--labels", str(clips["rec-a"].labels), "--out", str(out),
                 "--to-end", *args]) == 0
    err = capsys.readouterr().err
    assert "6 labelled and written, 0 already in the dataset" in err
    assert "read the topics up to where they ended" in err

    # the second stream's labels in absolute time (what a live capture has)
    b0 = origin + 60 * NS_PER_S
    replay_clip("rec-b", b0)
    iso = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b0 / NS_PER_S + 2 * i))
           for i in range(4)]
    labels_b = tmp_path / "b.csv"
    labels_b.write_text("stream_id,start,end,label\n" + "".join(
        f"rec-b,{iso[i]},{iso[i + 1]},{av.LABELS[d]}\n" for i, d in enumerate([4, 7, 1])))
    rc = main(["record", "--labels", str(labels_b), "--out", str(out), "--append", *args])
    assert rc == 2 and "labels ['seven'] are not among" in capsys.readouterr().err
    rc = main(["record", "--labels", str(labels_b), "--out", str(out), "--append",
               "--add-labels", *args])
    assert rc == 0
    err = capsys.readouterr().err
    assert "9 labelled and written" in err
    # the same topics recorded again: nothing new
    assert main(["record", "--labels", str(clips["rec-a"].labels), "--out", str(out),
                 "--append", *args]) == 0
    assert "0 labelled and written, 6 already in the dataset" in capsys.readouterr().err
    # windows cut otherwise cannot join the dataset
    rc = main(["record", "--labels", str(clips["rec-a"].labels), "--out", str(out),
               "--append", "--hop-ms", "250", *args])
    assert rc == 2 and "cut with hop_ms=500" in capsys.readouterr().err

    ds = Dataset(out)
    assert ds.labels == ["one", "four", "seven"]
    examples = ds.load()
    keys = [(e.window.stream_id, e.window.start_ns) for e in examples]
    assert len(keys) == len(set(keys)) == 15
    for e in examples:
        w = e.window
        t0, digits = (origin, [1, 4]) if w.stream_id == "rec-a" else (b0, [4, 7, 1])
        i, offset = divmod(w.start_ns - t0, 2 * NS_PER_S)
        assert offset in (0, NS_PER_S // 2, NS_PER_S) and e.label == av.LABELS[digits[i]]
    assert [r["windows_added"] for r in ds.manifest["recordings"]] == [6, 9, 0]


def test_record_refuses_missing_topics(settings: Settings, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    labels = tmp_path / "l.csv"
    labels.write_text("stream_id,start_s,end_s,label\ncam,0,2,one\n")
    rc = main(["record", "--labels", str(labels), "--out", str(tmp_path / "o"),
               "--bootstrap-servers", settings.bootstrap_servers,
               "--topic-prefix", settings.topic_prefix])
    assert rc == 2
    assert "missing topic" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
