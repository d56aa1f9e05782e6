"""`streamproc demo`, the README's main job, end to end on the session's real broker."""

from __future__ import annotations

import io
import json
import threading
import urllib.request

import pytest

from streamproc.asr.engine import DIGIT_WORDS
from streamproc.config import Settings
from streamproc.dev.demo import Layout, run
from streamproc.dev.localkafka import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_predicts_every_window_of_its_clips_and_summarises(settings: Settings,
                                                                tmp_path, capsys) -> None:
    layout = Layout(tmp_path / "demo")
    out = io.StringIO()
    port = free_port()
    s = settings.replace(metrics_port=free_port(), view_port=port)
    # the web view the demo serves, read while it runs (as a browser would, by its API)
    views: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state",
                                            timeout=3) as r:
                    views.append(json.load(r))
            except OSError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rc = run(s, own_broker=False, streams=2, layout=layout, preset="tiny", digits=3,
                 out=out)
    finally:
        done.set()
        watcher.join(10)
    text = out.getvalue()
    assert rc == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("window (UTC)")
    summary = next(line for line in lines if line.startswith("windows predicted:"))
    done, expected = (int(x) for x in summary.split()[2:5:2])
    assert done == expected > 0
    every = [json.loads(x) for x in (layout.logs / "predictions.jsonl").read_text().splitlines()]
    preds = [p for p in every if p["final"]]
    keys = [(p["stream_id"], p["window_start_ns"]) for p in preds]
    assert len(keys) == len(set(keys)) == expected
    assert {p["stream_id"] for p in preds} == {"cam1", "cam2"}
    assert all(p["label"] and p["model"]["name"] for p in every)
    assert any(line.startswith("accuracy:") for line in lines)
    # provisional predictions first (table rows tagged P), their finals after
    provisional = [p for p in every if not p["final"]]
    assert provisional and any(" P " in line for line in lines)
    assert any(line.startswith("provisional predictions (before the transcript") for line in lines)
    assert any(line.startswith("latency, window end -> first prediction") for line in lines)
    # it said where its view was, and the view showed both streams live, with the
    # worker's health
    assert f"live view: http://127.0.0.1:{port}/" in capsys.readouterr().err
    assert views, "the demo's view never answered"
    last = views[-1]
    assert set(last["streams"]) == {"cam1", "cam2"}
    assert all(v["tile"]["label"] and v["windows"] for v in last["streams"].values())
    assert any(v["streams"].get("cam1", {}).get("tile", {}).get("frame") for v in views)
    assert any(v["health"]["status"] == "ok" for v in views)
    # the clip files it replayed, and the cached model a second run reuses
    assert (layout.clips / "cam1.avi").stat().st_size > 0
    assert (layout.model / "recipe.sha256").exists()


def test_demo_asr_transcribes_the_clips_itself_and_scores_the_words(settings: Settings,
                                                                   tmp_path) -> None:
    """`streamproc demo --asr`: the clips replay without their SRT, `streamproc asr` makes
    the transcripts, the demo prints their word error rate, and every window is predicted
    with them."""
    from kafka import KafkaConsumer, TopicPartition

    from streamproc.wire import codec as wire

    layout = Layout(tmp_path / "demo")
    out = io.StringIO()
    s = settings.replace(metrics_port=free_port(), view_port=0)
    rc = run(s, own_broker=False, streams=2, layout=layout, preset="tiny", digits=3, asr=True,
             out=out)
    text = out.getvalue()
    (tmp_path / "demo-output.txt").write_text(text)  # what a user saw, kept with the logs
    assert rc == 0, text
    lines = text.splitlines()
    summary = next(line for line in lines if line.startswith("windows predicted:"))
    done, expected = (int(x) for x in summary.split()[2:5:2])
    assert done == expected > 0
    # the word error rate, overall and per clip, against what each clip says
    wer_line = next(line for line in lines if line.startswith("ASR ("))
    assert "word error rate" in wer_line and "%" in wer_line, wer_line
    per_clip = [line for line in lines if line.strip().startswith(("cam1: WER", "cam2: WER"))]
    assert len(per_clip) == 2, text
    # the transcripts on PREFIX.text are the recogniser's: finals with word timings (the
    # clips' SRT cues have none), digit words only (the demo's grammar engine)
    topic = s.topic("text")
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        segs: dict[tuple[int, int], wire.TranscriptSegment] = {}
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    seg = wire.decode(wire.KafkaRecord.from_client(m), expect_modality="text")
                    assert isinstance(seg, wire.TranscriptSegment)
                    segs[(m.partition, m.offset)] = seg
    finally:
        consumer.close()
    finals = [g for g in segs.values() if g.final and g.text]
    assert finals, "the recogniser published no final transcript"
    assert all(g.words for g in finals)
    assert {w for g in segs.values() for w in g.text.split()} <= set(DIGIT_WORDS)
    assert "asr worker stopped" in (layout.logs / "asr.log").read_text()
    # the predictions used them: windows whose text came from those segments
    every = [json.loads(x) for x in (layout.logs / "predictions.jsonl").read_text().splitlines()]
    preds = [p for p in every if p["final"]]
    assert {p["stream_id"] for p in preds} == {"cam1", "cam2"}
    with_text = [p for p in preds if p["modalities"]["text"]["present"]]
    assert with_text, "no window had a transcript"
    assert all(tuple(po) in segs for p in with_text for po in p["provenance"]["text"])
