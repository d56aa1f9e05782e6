"""Reading predictions from the real broker: duplicates from worker restarts are collapsed
by prediction key, in the API and in `streamproc consume`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import pytest
from kafka import KafkaProducer

from streamproc.config import Settings
from streamproc.readers import ConsumeStats, consume
from streamproc.testing import prediction
from streamproc.wire import codec as wire


@pytest.mark.broker
def test_consume_collapses_duplicates_from_kafka(topics: Settings) -> None:
    preds = [prediction("cam-1", i) for i in range(5)] + [prediction("cam-2", i) for i in range(3)]
    replayed = [prediction("cam-1", 3), prediction("cam-1", 4)]  # a restarted worker re-published
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap_servers, acks="all")
    for p in preds + replayed:
        kr = wire.encode_prediction(p)
        producer.send(topics.topic("predictions"), key=kr.key, value=kr.value,
                      headers=list(kr.headers), timestamp_ms=kr.timestamp_ms)
    producer.send(topics.topic("predictions"), key=b"cam-1", value=b"\xffnot json")
    producer.flush(30)
    producer.close()

    stats = ConsumeStats()
    got = list(consume(topics, stats=stats))
    assert sorted(p.key for p in got) == sorted(p.key for p in preds)
    assert stats.duplicates == 2 and stats.conflicting == 0 and stats.undecodable == 1
    assert [p.key for p in consume(topics, stream="cam-2")] == [p.key for p in preds[5:]]

    cli = subprocess.run(
        [sys.executable, "-m", "streamproc.cli", "consume", "--json", "--stream", "cam-1",
         "--bootstrap-servers", topics.bootstrap_servers, "--topic-prefix",
         topics.topic_prefix], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [(x["stream_id"], x["window_start_ns"]) for x in lines] == [p.key for p in preds[:5]]
    assert "2 duplicates collapsed" in cli.stderr


@pytest.mark.broker
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_consume_follow_stopped_by_a_signal_prints_its_summary(topics: Settings, sig: int,
                                                               code: int) -> None:
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap_servers, acks="all")
    for i in range(2):
        kr = wire.encode_prediction(prediction("cam-1", i))
        producer.send(topics.topic("predictions"), key=kr.key, value=kr.value,
                      headers=list(kr.headers), timestamp_ms=kr.timestamp_ms)
    producer.flush(30)
    producer.close()
    # SIGINT handled as when a terminal starts it: a test run launched in the background
    # ignores SIGINT, and a child inherits that
    start = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "runpy.run_module('streamproc.cli', run_name='__main__')")
    proc = subprocess.Popen(
        [sys.executable, "-c", start, "consume", "-f", "--json",
         "--bootstrap-servers", topics.bootstrap_servers, "--topic-prefix", topics.topic_prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(60, proc.kill)  # a hang fails the test instead of hanging it
    killer.start()
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]  # both read: it now waits for more
        assert all(line.startswith("{") for line in lines), lines
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "2 predictions (" in err and "Traceback" not in err


@pytest.mark.broker
def test_consume_without_topics_says_so(settings: Settings) -> None:
    from streamproc.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        list(consume(settings))


@pytest.mark.broker
def test_the_consume_command_without_topics_prints_one_line_and_no_table(
        settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    from streamproc import cli

    argv = ["consume", "--bootstrap-servers", settings.bootstrap_servers, "--topic-prefix",
            settings.topic_prefix]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no table header, no summary before the reason
    assert err == (f"streamproc consume: topic {settings.topic('predictions')} does not "
                   "exist (run `streamproc topics create`)\n")
