"""The worker's Prometheus endpoint: /metrics scraped over HTTP from a real worker serving
a model while clips are replayed, its numbers checked against what was sent and what was
published."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from metrics_helpers import Samples, parse, series, value
from pipeline_helpers import (
    Bad,
    bad_records,
    live_origin,
    make_clips,
    pipeline_settings,
    replay_clips,
    send_raw,
)
from worker_helpers import WorkerProc, oracle_windows, read_all, read_predictions

from streamproc.dev.localkafka import free_port
from streamproc.testing import MS, S
from streamproc.topics import create_topics
from streamproc.wire import codec as wire


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return parse(r.read().decode())


@pytest.mark.broker
@pytest.mark.slow
def test_worker_metrics_endpoint_matches_what_was_sent(
        kafka_bootstrap: str, tiny_model: Path, avdigits_tts: Path, tmp_path: Path) -> None:
    """Two streams of clips, then two undecodable records and a late frame; /metrics is
    scraped while the clips play and after: events in per modality, windows, masked
    modalities, dead letters by kind, batch sizes, latencies and consumer lag agree with
    what was sent and with the predictions read back."""
    clips = make_clips(tmp_path / "clips", {"m1": [4, 7], "m2": [2, 9]}, avdigits_tts)
    port = free_port()
    settings = pipeline_settings(kafka_bootstrap, tmp_path, tiny_model, clips,
                                 metrics_port=port)
    create_topics(settings)
    worker = WorkerProc(settings, tmp_path / "worker.log")
    try:
        worker.wait_for(r"Worker ready", timeout=120)
        during: list[Samples] = []
        stop = threading.Event()

        def scraper() -> None:
            while not stop.wait(0.5):
                during.append(scrape(port))

        t = threading.Thread(target=scraper)
        t.start()
        try:
            origin = live_origin(settings)
            records = replay_clips(settings, clips, origin)
        finally:
            stop.set()
            t.join(10)
        expected = oracle_windows(settings, records)
        every = read_predictions(settings, set(expected),
                                 timeout=settings.idle_deadline_text_ms / 1000 + 40,
                                 finals_only=False)
        # every window has closed: now a frame for the first windows is late
        late = wire.VideoFrame.from_image("m1", origin + 200 * MS, 90_002,
                                          np.zeros((64, 64, 3), np.uint8))
        bad = [b for b in bad_records("m1", origin + S, settings.max_message_bytes)
               if b.what in ("corrupt JPEG", "odd PCM length")]
        bad.append(Bad("late frame", "video", wire.encode(late), "already closed", "late"))
        send_raw(settings, bad)
        read_all(settings, settings.topic("deadletter"), lambda m: len(m) >= 3, 20)
        deadline = time.monotonic() + 30  # the lag gauge is refreshed every 5 s
        while True:
            final = scrape(port)
            lag = series(final, "streamproc_consumer_lag")
            if (len(lag) == 12 and not any(lag.values())
                    and value(final, "streamproc_dead_letters_total", kind="late") == 1):
                break
            assert time.monotonic() < deadline, (lag, worker.log()[-2000:])
            time.sleep(0.5)
        assert worker.stop() == 0, worker.log()[-3000:]
    finally:
        worker.abandon()

    # events in per modality: every record sent to each input topic, good or bad
    sent: dict[str, int] = defaultdict(int)
    for r in records:
        sent[r.modality] += 1
    for b in bad:
        sent[b.modality] += 1
    for m in ("video", "audio", "text"):
        assert value(final, "streamproc_events_in_total", modality=m) == sent[m], m
    # windows, and the modalities they were missing
    preds = [p for p in every if p.final]
    provisional = {p.key: p for p in every if not p.final}
    n, n_p = len(expected), len(provisional)
    assert {p.key for p in preds} == set(expected) and len(preds) == n
    assert 0 < n_p == len(every) - n and set(provisional) <= set(expected)
    assert value(final, "streamproc_windows_emitted_total") == n
    assert value(final, "streamproc_windows_published_total") == n
    for m in ("video", "audio", "text"):
        masked = sum(m in p.body["modalities"]["missing"] for p in preds)
        assert value(final, "streamproc_windows_masked_total", modality=m) == masked, m
    assert value(final, "streamproc_windows_masked_total", modality="text") > 0
    # dead letters by kind
    assert series(final, "streamproc_dead_letters_total") == {
        frozenset({("kind", "decode")}): 2, frozenset({("kind", "late")}): 1}
    assert value(final, "streamproc_decode_errors_total", modality="video") == 1
    assert value(final, "streamproc_decode_errors_total", modality="audio") == 1
    assert value(final, "streamproc_late_total", modality="video") == 1
    # batches: every window in exactly one batch, none over the maximum; a provisional
    # one too, and its final again unless nothing changed (then its scores are reused)
    reused = sum(p.body["reused"] for p in preds)
    flips = sum(provisional[p.key].body["label"] != p.body["label"]
                for p in preds if p.key in provisional)
    assert value(final, "streamproc_predictions_reused_total") == reused
    assert value(final, "streamproc_label_flips_total") == flips
    assert value(final, "streamproc_windows_provisional_total") == n_p
    batches = value(final, "streamproc_batch_size_count")
    assert 1 <= batches <= n + n_p - reused
    assert value(final, "streamproc_batch_size_sum") == n + n_p - reused
    assert value(final, "streamproc_batch_size_bucket", le=f"{settings.batch_size:.1f}") == batches
    assert value(final, "streamproc_inference_seconds_count") == batches
    assert value(final, "streamproc_inference_seconds_sum") > 0
    # latencies: one observation per prediction (end-to-end: per final, provisional: per
    # provisional one); window end -> published minus added is the time each window
    # waited to close, which its prediction reports
    assert value(final, "streamproc_added_latency_seconds_count") == n + n_p
    assert value(final, "streamproc_end_to_end_latency_seconds_count") == n
    assert value(final, "streamproc_provisional_latency_seconds_count") == n_p
    assert value(final, "streamproc_provisional_to_final_seconds_count") == n_p
    added = value(final, "streamproc_added_latency_seconds_sum")
    e2e = value(final, "streamproc_end_to_end_latency_seconds_sum") + \
        value(final, "streamproc_provisional_latency_seconds_sum")
    close_s = sum(p.body["latency_ms"]["close"] for p in every) / 1000
    assert e2e - added == pytest.approx(close_s, abs=1e-4 * (n + n_p))
    # observed after the publish returned, so at least what the predictions say
    assert added >= sum(p.body["latency_ms"]["added"] for p in every) / 1000 - 1e-5 * len(every)
    # scraped while the clips played: counts growing, lag never negative
    ins = [value(s, "streamproc_events_in_total", modality="video") for s in during]
    assert len(during) >= 4 and 0 < max(ins) < sent["video"]
    assert ins == sorted(ins)
    assert all(v >= 0 for s in during for v in series(s, "streamproc_consumer_lag").values())
    assert {dict(lbl)["topic"] for lbl in lag} == set(settings.input_topics)
    assert series(final, "streamproc_buffered")  # the aligners' holdings are reported
