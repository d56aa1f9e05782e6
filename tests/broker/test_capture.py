"""Sources through the real broker: file replay (CLI and API), camera under a slow outbox,
microphone chunks, transcript stdin, unreachable broker, clean flush on SIGTERM."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from media_helpers import (
    SRT,
    SRT_SPANS_NS,
    SRT_TEXTS,
    VIDEO_FPS,
    container_times,
    decode_all,
    decoded_audio,
    make_frames,
    pcm24,
    read_topic,
    speech_wav,
    tone,
    wav_pcm,
    write_av,
    write_video,
    write_wav_bytes,
)

from streamproc.capture.publisher import Publisher
from streamproc.capture.sources import CameraSource, MicSource, ReplaySpec, replay_many
from streamproc.config import Settings
from streamproc.dev.localkafka import free_port
from streamproc.testing import T0, ManualClock
from streamproc.wire import codec as wire

pytestmark = pytest.mark.broker

S = 1_000_000_000
MS = 1_000_000
REPO = Path(__file__).resolve().parents[2]
CLI = str(REPO / ".venv" / "bin" / "streamproc")


def cli_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "STREAMPROC_BOOTSTRAP": settings.bootstrap_servers,
            "STREAMPROC_TOPIC_PREFIX": settings.topic_prefix,
            "STREAMPROC_PARTITIONS": str(settings.partitions)}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("media")
    frames = make_frames(20)
    (d / "talk.srt").write_text(SRT)
    return SimpleNamespace(frames=frames, video=write_video(d / "clip.avi", frames),
                           speech=speech_wav(d / "speech.wav"), srt=d / "talk.srt")


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_cli_file_replay_fast_lands_aligned_and_complete(topics: Settings, media) -> None:
    origin = 1_790_000_000 * S  # --start-at: every modality is shifted by this one origin
    proc = subprocess.run(
        [CLI, "produce", "file", "--stream-id", "clip-1", str(media.video),
         "--audio", str(media.speech), "--transcript", str(media.srt), "--fast",
         "--start-at", str(origin // S)],
        capture_output=True, text=True, env=cli_env(topics), timeout=120)
    assert proc.returncode == 0, proc.stderr
    pcm, rate, _ = wav_pcm(media.speech)
    n_chunks = -(-(len(pcm) // 2) // (rate // 10))
    assert f"20 frames, {n_chunks} audio chunks, 3 transcript segments" in proc.stdout
    assert f"delivered {20 + n_chunks + 3} of {20 + n_chunks + 3} records" in proc.stdout

    video = decode_all(read_topic(topics, topics.topic("video"), 20), "video")
    audio = decode_all(read_topic(topics, topics.topic("audio"), n_chunks), "audio")
    text = decode_all(read_topic(topics, topics.topic("text"), 3), "text")
    assert (len(video), len(audio), len(text)) == (20, n_chunks, 3)
    for recs in (video, audio, text):
        assert {r.stream_id for r in recs} == {"clip-1"}
        assert [r.seq for r in recs] == list(range(len(recs)))
        assert all(b.ts_ns > a.ts_ns for a, b in itertools.pairwise(recs))
    assert [f.ts_ns - origin for f in video] == [round(i * S / VIDEO_FPS) for i in range(20)]
    for f, want in zip(video, media.frames, strict=True):
        assert mean_abs_diff(f.image(), want) < 8  # JPEG of an MJPG frame: close, not equal
    # audio: the speech WAV at its own rate, sample-continuous, every sample once
    assert audio[0].ts_ns == origin
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(audio))
    assert {(a.sample_rate, a.fmt) for a in audio} == {(rate, "s16le")}
    assert sum(a.n_samples for a in audio) == len(pcm) // 2
    assert b"".join(a.data for a in audio) == pcm
    assert [(t.start_ns - origin, t.end_ns - origin) for t in text] == SRT_SPANS_NS
    assert [t.text for t in text] == SRT_TEXTS


def test_replay_many_streams_at_once_in_real_time(topics: Settings, media) -> None:
    specs = [ReplaySpec(f"cam-{i}", media.video, transcript=media.srt) for i in range(3)]
    t0 = time.monotonic()
    with Publisher(topics) as pub:
        stats = replay_many(pub, specs, realtime=True)
    elapsed = time.monotonic() - t0
    # paced by event time: the clip spans 1.9 s (its last cue), so it cannot finish sooner
    assert elapsed >= 1.8
    assert [s.frames for s in stats] == [20, 20, 20]
    assert len({s.origin_ns for s in stats}) == 1  # one clock origin for all streams
    video = decode_all(read_topic(topics, topics.topic("video"), 60), "video")
    text = decode_all(read_topic(topics, topics.topic("text"), 9), "text")
    for i in range(3):
        frames = [f for f in video if f.stream_id == f"cam-{i}"]
        assert [f.seq for f in frames] == list(range(20))
        segs = [t for t in text if t.stream_id == f"cam-{i}"]
        assert [(t.start_ns - stats[i].origin_ns, t.end_ns - stats[i].origin_ns)
                for t in segs] == SRT_SPANS_NS


class SlowOutbox:
    """A Publisher behind a deliberately slow hop, noting when capture had finished."""

    def __init__(self, publisher: Publisher, delay_s: float) -> None:
        self.publisher, self.delay_s = publisher, delay_s
        self.camera: CameraSource | None = None
        self.published_when_capture_done: int | None = None
        self.count = 0

    def publish(self, record: wire.MediaRecord) -> None:
        done = self.camera is not None and self.camera.stats.capture_finished.is_set()
        if done and self.published_when_capture_done is None:
            self.published_when_capture_done = self.count
        time.sleep(self.delay_s)
        self.publisher.publish(record)
        self.count += 1


def test_camera_drops_oldest_when_publishing_is_slow_and_gaps_show(topics: Settings,
                                                                  tmp_path) -> None:
    frames = make_frames(40)
    video = write_video(tmp_path / "cam.avi", frames)
    with Publisher(topics) as pub:
        outbox = SlowOutbox(pub, delay_s=0.15)
        # unpaced: the file is read as fast as a camera faster than the outbox would deliver
        cam = CameraSource(outbox, "cam-slow", video.as_uri(), queue_size=4, pace=False)
        outbox.camera = cam
        st = cam.run()
    # the capture loop read all 40 frames while the slow outbox had taken only a few
    assert st.captured == 40
    assert outbox.published_when_capture_done is not None
    assert outbox.published_when_capture_done < 10
    assert st.dropped > 0 and st.published + st.dropped == st.captured
    got = decode_all(read_topic(topics, topics.topic("video"), st.published), "video")
    seqs = [f.seq for f in got]
    assert len(seqs) == st.published and seqs == sorted(set(seqs))
    assert 40 - len(seqs) == st.dropped  # every drop is a sequence gap, nothing else is
    assert seqs[-4:] == [36, 37, 38, 39]  # oldest dropped first: the newest survive
    assert all(b.ts_ns > a.ts_ns for a, b in itertools.pairwise(got))
    for f in got:
        assert mean_abs_diff(f.image(), frames[f.seq]) < 8


def test_mic_chunks_stay_continuous_through_kafka(topics: Settings) -> None:
    with Publisher(topics) as pub:
        clock = ManualClock()
        mic = MicSource(pub, "mic-1", rate=48000, channels=2, chunk_ms=20, clock=clock)
        rng = np.random.default_rng(2)
        blocks = [rng.integers(-9000, 9000, (960, 2), dtype=np.int16) for _ in range(25)]
        adc0 = 100.0
        for k, b in enumerate(blocks):  # callbacks 21 ms after each block's first sample
            clock.now = T0 + k * 20 * MS + 21 * MS + int(rng.integers(0, 2 * MS))
            info = SimpleNamespace(inputBufferAdcTime=adc0 + k * 0.02,
                                   currentTime=adc0 + k * 0.02 + 0.021)
            mic.callback(b, 960, info, SimpleNamespace(input_overflow=False))
        mic.publish_pending()
    got = decode_all(read_topic(topics, topics.topic("audio"), 25), "audio")
    assert [c.seq for c in got] == list(range(25))
    assert abs(got[0].ts_ns - T0) <= 2 * MS
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(got))
    assert {(c.sample_rate, c.channels) for c in got} == {(48000, 2)}
    assert b"".join(c.data for c in got) == b"".join(b.tobytes() for b in blocks)


def test_cli_transcript_from_stdin(topics: Settings) -> None:
    now = time.time_ns()
    lines = ("hello there\n"
             '{"text": "partial", "final": false}\n'
             "{broken json\n"
             f'{{"text": "timed", "start_ns": {now}, "end_ns": {now + S}, "lang": "en"}}\n')
    plain = subprocess.run([CLI, "produce", "transcript", "--stream-id", "t-1"],
                           input="first line\nsecond line\n", capture_output=True, text=True,
                           env=cli_env(topics), timeout=60)
    assert plain.returncode == 0, plain.stderr
    jsonl = subprocess.run([CLI, "produce", "transcript", "--stream-id", "t-2", "--jsonl"],
                           input=lines, capture_output=True, text=True, env=cli_env(topics),
                           timeout=60)
    assert jsonl.returncode == 0, jsonl.stderr
    assert "<stdin>:1: not JSON" in jsonl.stderr  # a plain line where JSON was promised
    assert "<stdin>:3: not JSON" in jsonl.stderr
    assert "2 transcript segments (1 partial), 2 line(s) skipped" in jsonl.stdout
    segs = decode_all(read_topic(topics, topics.topic("text"), 4), "text")
    assert len(segs) == 4
    t1 = [s for s in segs if s.stream_id == "t-1"]
    t2 = [s for s in segs if s.stream_id == "t-2"]
    assert [s.text for s in t1] == ["first line", "second line"]
    assert all(now - 60 * S < s.start_ns <= s.end_ns <= time.time_ns() for s in t1)
    assert [(s.seq, s.text, s.final) for s in t2] == [(0, "partial", False), (1, "timed", True)]
    assert (t2[1].start_ns, t2[1].end_ns, t2[1].lang) == (now, now + S, "en")


@pytest.mark.parametrize("lang", ["C", "C.UTF-8"])
def test_cli_transcript_skips_stdin_lines_that_are_not_utf8(topics: Settings, lang: str) -> None:
    sid = f"t-bad-{lang}"
    proc = subprocess.run([CLI, "produce", "transcript", "--stream-id", sid],
                          input=b"before\n\xff\xfebad\nafter\n", capture_output=True,
                          env={**cli_env(topics), "LC_ALL": lang, "LANG": lang}, timeout=60)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "<stdin>:2: not UTF-8 (bad byte at column 1); line skipped" in err
    assert f"{sid}: 2 transcript segments (0 partial), 1 line(s) skipped" in out
    assert "delivered 2 of 2 records" in out


def test_cli_fast_replay_too_far_ahead_for_the_broker_is_refused_up_front(
        topics: Settings, media) -> None:
    start = time.time() + 2 * 3600  # the local broker refuses records over 1 h ahead
    proc = subprocess.run([CLI, "produce", "file", "--stream-id", "fut", str(media.video),
                           "--start-at", str(start), "--fast"], capture_output=True, text=True,
                          env=cli_env(topics), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "streamproc produce: --start-at is 2.0 h ahead of now and the broker refuses " \
        "records more than 1 h ahead (message.timestamp.after.max.ms=3600000)" in proc.stderr
    assert "delivered" not in proc.stdout


def test_cli_a_flood_of_refused_records_is_a_few_lines_not_one_per_record(
        topics: Settings) -> None:
    ahead = time.time_ns() + 2 * 3600 * S  # the local broker refuses records over 1 h ahead
    lines = "".join(f'{{"text": "w{i}", "start_ns": {ahead + i * S}, '
                    f'"end_ns": {ahead + i * S + 1}}}\n' for i in range(120))
    proc = subprocess.run([CLI, "produce", "transcript", "--stream-id", "fut", "--jsonl"],
                          input=lines, capture_output=True, text=True, env=cli_env(topics),
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "delivered 0 of 120 records" in proc.stdout
    err = proc.stderr.splitlines()
    # the 1st, 10th and 100th refusal, then the summary: one kind with its count
    assert [line[line.index("(") + 1:line.index(")")] for line in err[:3]] == [
        "1 so far of this kind", "10 so far of this kind", "100 so far of this kind"], err
    assert err[3:] == ["120 record(s) NOT delivered:",
                       "  120 x InvalidRecordError: [Error 87] InvalidRecordError: Timestamp N "
                       "of message with offset N is out of range. The timestamp should be "
                       "within [-N, N]"], err


def test_cli_exits_nonzero_with_a_readable_message_when_the_broker_is_unreachable(
        media) -> None:
    env = {**os.environ, "STREAMPROC_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run([CLI, "produce", "file", "--stream-id", "x", str(media.video),
                           "--fast"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no Kafka broker reachable at 127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_sigterm_stops_capture_and_flushes_everything(topics: Settings, media) -> None:
    proc = subprocess.Popen(
        [CLI, "produce", "file", "--stream-id", "loop-1", str(media.video), "--transcript",
         str(media.srt), "--loop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(topics))
    try:
        # 32 frames: into the second pass, past its first cue (due at 2.8 s, before frame 28)
        read_topic(topics, topics.topic("video"), 32, timeout=60, settle=0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    m = re.search(r"delivered (\d+) of (\d+) records \(video (\d+), audio 0, text (\d+)\)", out)
    assert m, out
    delivered, sent, n_video, n_text = map(int, m.groups())
    assert delivered == sent and n_video >= 32
    # the stop summary counts what was published, as `delivered` does
    assert f"published {n_video} frames, 0 audio chunks, {n_text} transcript segments" in out
    video = decode_all(read_topic(topics, topics.topic("video"), n_video), "video")
    text = decode_all(read_topic(topics, topics.topic("text"), n_text), "text")
    assert len(video) == n_video and len(text) == n_text  # all that was sent, nothing more
    assert [f.seq for f in video] == list(range(n_video))
    # the loop keeps one timeline: pass 2 starts where pass 1's longest modality ended
    # (20 frames at 10 fps: 2.0 s, longer than the SRT's 1.9 s)
    assert video[20].ts_ns - video[0].ts_ns == 2 * S
    assert text[3].start_ns - text[0].start_ns == 2 * S


def test_cli_camera_on_a_file_url_resizes_and_ends_with_the_file(topics: Settings,
                                                                 media) -> None:
    t0 = time.time_ns()
    proc = subprocess.run([CLI, "produce", "camera", "--stream-id", "cam-cli", "--device",
                           media.video.as_uri(), "--size", "80x60", "--jpeg-quality", "70",
                           "--fps", str(VIDEO_FPS)],
                          capture_output=True, text=True, env=cli_env(topics), timeout=120)
    done = time.time_ns()
    assert proc.returncode == 0, proc.stderr
    # --fps at the file's own rate keeps every frame: they are stamped by the file
    assert "20 frames captured, 20 published, 0 dropped" in proc.stdout
    assert "0 skipped by --fps" in proc.stdout
    frames = decode_all(read_topic(topics, topics.topic("video"), 20), "video")
    assert [f.seq for f in frames] == list(range(20))
    assert {(f.width, f.height) for f in frames} == {(80, 60)}
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [
        round(i * S / VIDEO_FPS) for i in range(20)]
    # paced: the last frame's time had come before the command ended
    assert t0 < frames[0].ts_ns and frames[-1].ts_ns <= done



VFR_PTS_MS = [0, 40, 70, 200, 230, 500, 533, 1000, 1010, 1400]


def test_cli_mp4_sends_its_own_audio_track_and_keeps_variable_frame_times(
        topics: Settings, media, tmp_path: Path) -> None:
    """An MP4 as a phone writes it (H.264 at a variable rate + AAC 48 kHz stereo) with an
    SRT: every frame at its container time, the AAC track sample-continuous."""
    clip = write_av(tmp_path / "phone.mp4", make_frames(len(VFR_PTS_MS), (96, 64)),
                    VFR_PTS_MS, audio=tone(1.6, 48000), rate=48000)
    origin = 1_790_000_000 * S
    proc = subprocess.run(
        [CLI, "produce", "file", "--stream-id", "mp4-1", str(clip), "--transcript",
         str(media.srt), "--fast", "--start-at", str(origin // S)],
        capture_output=True, text=True, env=cli_env(topics), timeout=120)
    assert proc.returncode == 0, proc.stderr
    samples, rate = decoded_audio(clip)
    n_chunks = -(-len(samples) // (rate // 10))
    n = len(VFR_PTS_MS) + n_chunks + 3
    assert f"published {len(VFR_PTS_MS)} frames, {n_chunks} audio chunks, 3 transcript" \
        in proc.stdout
    assert f"delivered {n} of {n} records" in proc.stdout

    video = decode_all(read_topic(topics, topics.topic("video"), len(VFR_PTS_MS)), "video")
    audio = decode_all(read_topic(topics, topics.topic("audio"), n_chunks), "audio")
    text = decode_all(read_topic(topics, topics.topic("text"), 3), "text")
    assert (len(video), len(audio), len(text)) == (len(VFR_PTS_MS), n_chunks, 3)
    assert [f.ts_ns - origin for f in video] == container_times(clip, "video") == [
        p * MS for p in VFR_PTS_MS]
    assert {(a.sample_rate, a.channels, a.fmt) for a in audio} == {(48000, 2, "f32le")}
    assert audio[0].ts_ns == origin + container_times(clip, "audio")[0]
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(audio))
    assert sum(a.n_samples for a in audio) == len(samples)
    np.testing.assert_allclose(np.concatenate([a.samples() for a in audio]), samples,
                               atol=1e-6)
    assert [(t.start_ns - origin, t.end_ns - origin) for t in text] == SRT_SPANS_NS


@pytest.mark.parametrize(("rate", "bits", "is_float"), [(44100, 24, False), (48000, 32, True)])
def test_cli_avi_with_an_extensible_wav_lands_exactly(topics: Settings, media, tmp_path: Path,
                                                      rate: int, bits: int,
                                                      is_float: bool) -> None:
    """AVI + a WAVE_FORMAT_EXTENSIBLE WAV as ffmpeg writes them (24-bit 44.1 kHz stereo,
    32-bit float 48 kHz stereo): every sample arrives, on the video's clock."""
    x = tone(1.25, rate) * np.array([0.9, -0.7])
    if is_float:
        data, want = x.astype("<f4").tobytes(), x.astype(np.float32)
    else:
        data, ints = pcm24(x)
        want = (ints / float(1 << 23)).astype(np.float32)
    wav = write_wav_bytes(tmp_path / "ext.wav", data, rate, 2, bits, float_=is_float,
                          extensible=True)
    origin = 1_790_000_000 * S
    proc = subprocess.run(
        [CLI, "produce", "file", "--stream-id", "avi-1", str(media.video), "--audio", str(wav),
         "--fast", "--start-at", str(origin // S)],
        capture_output=True, text=True, env=cli_env(topics), timeout=120)
    assert proc.returncode == 0, proc.stderr
    n_chunks = -(-len(want) // (rate // 10))
    assert f"published 20 frames, {n_chunks} audio chunks, 0 transcript" in proc.stdout
    video = decode_all(read_topic(topics, topics.topic("video"), 20), "video")
    audio = decode_all(read_topic(topics, topics.topic("audio"), n_chunks), "audio")
    assert len(video) == 20 and len(audio) == n_chunks
    assert [f.ts_ns - origin for f in video] == [round(i * S / VIDEO_FPS) for i in range(20)]
    assert {(a.sample_rate, a.channels, a.fmt) for a in audio} == {(rate, 2, "f32le")}
    assert audio[0].ts_ns == origin
    assert all(b.ts_ns == a.end_ns for a, b in itertools.pairwise(audio))
    np.testing.assert_array_equal(np.concatenate([a.samples() for a in audio]), want)


def test_cli_audio_and_transcript_without_a_video(topics: Settings, media) -> None:
    origin = 1_790_000_000 * S
    proc = subprocess.run(
        [CLI, "produce", "file", "--stream-id", "radio-1", "--audio", str(media.speech),
         "--transcript", str(media.srt), "--fast", "--start-at", str(origin // S)],
        capture_output=True, text=True, env=cli_env(topics), timeout=120)
    assert proc.returncode == 0, proc.stderr
    pcm, rate, _ = wav_pcm(media.speech)
    n_chunks = -(-(len(pcm) // 2) // (rate // 10))
    assert f"delivered {n_chunks + 3} of {n_chunks + 3} records (video 0, audio {n_chunks}, " \
        "text 3)" in proc.stdout
    audio = decode_all(read_topic(topics, topics.topic("audio"), n_chunks), "audio")
    text = decode_all(read_topic(topics, topics.topic("text"), 3), "text")
    assert b"".join(a.data for a in audio) == pcm and audio[0].ts_ns == origin
    assert [(t.start_ns - origin, t.end_ns - origin) for t in text] == SRT_SPANS_NS
    assert read_topic(topics, topics.topic("video"), 0, settle=1.0) == []
    nothing = subprocess.run([CLI, "produce", "file", "--stream-id", "x"], capture_output=True,
                             text=True, env=cli_env(topics), timeout=60)
    assert nothing.returncode == 2
    assert "nothing to replay: give a video, an audio file or a transcript" in nothing.stderr
