"""A debug check that nothing the worker's event loop calls per record blocks it.

The door checks (``wire.decode``) and the aligner (``Aligner.add`` / ``poll``) run on the
event loop. A lazy import or a decode inside them stalls every stream the first time a
record takes that path (importing scipy.signal for the first 44.1 kHz window took 1.7-7 s),
and work that grows with what a record claims stalls them every time (resampling 44101 Hz
audio with its exact 16000-phase filter took 0.6-1 s a window). So the first record of every audio rate and frame size goes through them in a fresh
interpreter, where nothing but the modules themselves is imported yet, and no single call
may take long. The bound is far above what the work needs (a few ms) so that a loaded
machine never trips it; it is a check for blocking, not a timing goal.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from streamproc.wire import codec as wire
from streamproc.wire.codec import AudioChunk, TranscriptSegment, VideoFrame

S = 1_000_000_000
T0 = 1_800_000_000 * S
# the usual rates, and one whose exact ratio to 16 kHz (16000/44101) needs a huge filter
RATES = (16_000, 44_100, 48_000, 44_101)
SIZES = ((320, 240), (640, 480), (1280, 720))
BOUND_S = 0.5

# Runs in the fresh interpreter: import what the worker imports for these calls, then time
# every call on the records given, in arrival order, with the wall clock at event time.
CHILD = r"""
import base64, json, sys, time
from streamproc.wire import codec as wire
from streamproc.align.aligner import AlignConfig, Aligner
from streamproc.config import Settings

cases = json.load(open(sys.argv[1]))
slowest = {}
def timed(name, f, *a):
    t = time.perf_counter()
    out = f(*a)
    d = time.perf_counter() - t
    if d > slowest.get(name, (0.0, ""))[0]:
        slowest[name] = (d, case)
    return out
for case, recs in cases.items():
    # transcripts not waited for, so windows close in poll() as the records come
    settings = Settings(expected_modalities="video,audio")
    aligner = Aligner(AlignConfig.from_settings(settings))
    windows = 0
    for key, value, headers, topic in recs:
        kr = wire.KafkaRecord(base64.b64decode(key), base64.b64decode(value),
                              tuple((k, base64.b64decode(v)) for k, v in headers), None,
                              topic, 0, 0)
        rec = timed("decode", wire.decode, kr)
        now = rec.end_ns
        assert timed("add", aligner.add, rec, now).status == "accepted"
        windows += len(timed("poll", aligner.poll, now))
    windows += len(timed("flush", aligner.flush))
    assert windows > 0, case
print(json.dumps(slowest))
"""


def _records(case: str, rate: int, size: tuple[int, int], fmt: str) -> list:
    """Two seconds of one stream: frames of ``size`` at 10 fps, stereo audio at ``rate``
    in 100 ms chunks, one transcript segment; in event-time order, as Kafka records."""
    rng = np.random.default_rng(rate + size[0])
    img = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
    frame = VideoFrame.from_image(case, T0, 0, img, fmt)
    recs: list = []
    for i in range(20):
        recs.append(VideoFrame(case, T0 + i * S // 10, i, frame.data, fmt, *size))
    n = rate // 10
    for i in range(20):
        pcm = rng.uniform(-0.5, 0.5, (n, 2))
        recs.append(AudioChunk.from_samples(case, T0 + i * S // 10, i, pcm, rate))
    recs.append(TranscriptSegment(case, 0, "hello there", T0 + S // 2, T0 + S))
    recs.sort(key=lambda r: r.end_ns)
    out = []
    for r in recs:
        kr = wire.encode(r)
        out.append([base64.b64encode(kr.key).decode(), base64.b64encode(kr.value).decode(),
                    [[k, base64.b64encode(v).decode()] for k, v in kr.headers], r.modality])
    return out


def test_first_record_of_each_rate_and_frame_size_does_not_block(tmp_path: Path) -> None:
    cases = {}
    for rate, size, fmt in [(r, s, "jpeg") for r in RATES for s in SIZES] + \
            [(RATES[0], s, "png") for s in SIZES]:
        case = f"{rate}Hz-{size[0]}x{size[1]}-{fmt}"
        cases[case] = _records(case, rate, size, fmt)
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    slowest = json.loads(proc.stdout)
    assert set(slowest) == {"decode", "add", "poll", "flush"}
    blocked = {name: (round(d, 3), case) for name, (d, case) in slowest.items()
               if d > BOUND_S}
    assert not blocked, f"calls on the event loop took longer than {BOUND_S} s: {blocked}"
