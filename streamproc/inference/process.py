"""The model in a process of its own (``--model-in process``).

The worker's event loop, the Kafka consumer's thread and a model thread share one
interpreter lock. torch lets go of it in every operation, and the model thread then waits
to get it back while the loop runs: on W1, a batch takes 3.5-4.6 times as long beside a
busy loop as alone (benchmarks/bench_model_gil.py). A child process has an interpreter of
its own: the model thread only writes each batch to it and waits for the scores, without
the lock.

Nothing crosses the pipe pickled: a request is a kind byte and a JSON header, then the
windows' frames, samples and masks as raw bytes; an answer is JSON. The child serves the
same checkpoint as the worker's :class:`~streamproc.inference.predictor.Predictor` (which
keeps a copy for what it says about the model), loads the one a hot reload swaps in, and
is started again if it dies (the batch it was computing fails and is retried alone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

from streamproc.align.aligner import AlignConfig, Window
from streamproc.config import Settings
from streamproc.inference.predictor import Predictor, Scored, Served, load_served
from streamproc.wire.codec import TranscriptSegment, VideoFrame, segment_from_json

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
SCORE, SERVE, WARM = b"B", b"S", b"W"


# --- windows as bytes ------------------------------------------------------------------


def encode_windows(windows: Sequence[Window]) -> bytes:
    """What the model reads of ``windows``: a JSON header, then the frames' bytes, each
    window's float32 samples and its bool mask, in header order."""
    head: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for w in windows:
        audio = np.ascontiguousarray(w.audio, np.float32)
        mask = np.ascontiguousarray(w.audio_mask, np.bool_)
        head.append({
            "stream_id": w.stream_id, "start_ns": w.start_ns, "end_ns": w.end_ns,
            "frames": [[f.seq, f.ts_ns, f.fmt, f.width, f.height, len(f.data)]
                       for f in w.frames],
            "frame_count": w.frame_count, "samples": len(audio), "sample_rate": w.sample_rate,
            "segments": [[s.seq, s.to_json()] for s in w.segments], "present": w.present,
            "quality": w.quality, "rev": w.rev, "final": w.final, "unchanged": w.unchanged})
        blobs += [f.data for f in w.frames]
        blobs += [audio.tobytes(), mask.tobytes()]
    header = json.dumps(head, default=_plain).encode()
    return b"".join([_LEN.pack(len(header)), header, *blobs])


def _plain(value: Any) -> Any:
    """numpy scalars in a window's quality as the numbers they are."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} in a window is not JSON")


def decode_windows(data: bytes) -> list[Window]:
    """The windows :func:`encode_windows` wrote (without their provenance and ingest
    times, which no model reads)."""
    (n,) = _LEN.unpack_from(data)
    head = json.loads(data[_LEN.size:_LEN.size + n])
    at = _LEN.size + n
    out = []
    for h in head:
        sid = h["stream_id"]
        frames = []
        for seq, ts, fmt, width, height, size in h["frames"]:
            frames.append(VideoFrame(sid, ts, seq, data[at:at + size], fmt, width, height))
            at += size
        k = h["samples"]
        audio = np.frombuffer(data, np.float32, k, at).copy()
        at += 4 * k
        mask = np.frombuffer(data, np.bool_, k, at).copy()
        at += k
        segments: list[TranscriptSegment] = [segment_from_json(obj, sid, seq)
                                             for seq, obj in h["segments"]]
        out.append(Window(sid, h["start_ns"], h["end_ns"], frames, h["frame_count"], audio,
                          mask, h["sample_rate"], segments, h["present"], h["quality"],
                          rev=h["rev"], final=h["final"], unchanged=h["unchanged"]))
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes after the last window")
    return out


# --- framing ---------------------------------------------------------------------------


def _send(out: IO[bytes], payload: bytes) -> None:
    out.write(_LEN.pack(len(payload)))
    out.write(payload)
    out.flush()


def _recv(inp: IO[bytes]) -> bytes | None:
    head = inp.read(_LEN.size)
    if len(head) < _LEN.size:
        return None  # the other side is gone
    (n,) = _LEN.unpack(head)
    data = inp.read(n)
    if len(data) < n:
        return None
    return data


# --- the worker's side -----------------------------------------------------------------


class ModelDied(RuntimeError):
    """The model process exited; it is started again for the next batch."""


class ProcessPredictor(Predictor):
    """A :class:`Predictor` whose batches run in a child process.

    Its own copy of the model (loaded here on the CPU, never called) tells the worker what
    it serves; the child loads the same ``spec`` on ``device`` and scores every batch.
    """

    def __init__(self, spec: str, device: str = "auto", threads: int | None = None) -> None:
        super().__init__(spec, "cpu", threads)
        self._args = (spec, str(device), str(threads or 0))
        self._lock = threading.Lock()  # one request at a time: the model thread, a reload
        self._warm: tuple[int, AlignConfig] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: IO[bytes] | None = None
        self._from: IO[bytes] | None = None
        self._start(spec)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _start(self, spec: str) -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        _, device, threads = self._args
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "streamproc.inference.process", spec, device, threads,
             str(to_r), str(from_w)], pass_fds=(to_r, from_w),
            # a terminal's Ctrl-C is the worker's to handle: the child ends when its pipe
            # closes, after the worker's last batch
            start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self._to, self._from = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")
        ready = self._answer()
        import torch  # loaded by the Predictor already (an align-only worker never is one)

        self.device = torch.device(ready["device"])  # where the batches run
        log.info("model process %d serves %s on %s", self._proc.pid, ready["info"],
                 self.device)

    def _answer(self) -> dict[str, Any]:
        assert self._from is not None
        data = _recv(self._from)
        if data is None:
            code = self._proc.wait() if self._proc is not None else None
            raise ModelDied(f"the model process exited (code {code})")
        reply: dict[str, Any] = json.loads(data)
        if "error" in reply:
            raise RuntimeError(f"model process: {reply['error']}")
        return reply

    def _request(self, kind: bytes, payload: bytes) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._restart()
            try:
                self._write(kind + payload)
            except BrokenPipeError:  # gone before it read this: a new one computes it
                self._restart()
                self._write(kind + payload)
            try:
                return self._answer()
            except ModelDied as e:
                self._proc_gone()
                raise ModelDied(f"{e} during a request; it is started again for the next "
                                "one") from None

    def _write(self, data: bytes) -> None:
        assert self._to is not None
        _send(self._to, data)

    def _proc_gone(self) -> None:
        for f in (self._to, self._from):
            if f is not None:
                with contextlib.suppress(OSError):  # a pipe whose other end is gone
                    f.close()
        self._to = self._from = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _restart(self) -> None:
        old = self._proc
        self._proc_gone()  # waits for it: its exit code is known after this
        code = None if old is None else old.returncode
        log.warning("model process gone (exit code %s): starting it again", code)
        self._start(self.served.spec)
        if self._warm is not None:
            self._write(WARM + _warm_request(*self._warm))
            self._answer()

    def __call__(self, windows: Sequence[Window]) -> list[Scored]:
        reply = self._request(SCORE, encode_windows(windows))
        return [Scored(s["label"], s["scores"], s["preprocess_ms"], s["model_ms"], s["model"],
                       tuple(s["reused"])) for s in reply["scored"]]

    def load(self, spec: str | None = None) -> Served:
        """A model loaded here on the CPU (what it says about itself); the child loads it
        where it runs when it is swapped in."""
        return load_served(spec or self.spec, "cpu")

    def decode_early(self, frame: VideoFrame) -> None:
        """Nothing: the child decodes a batch's frames itself."""

    def warm_up(self, max_batch: int, cfg: AlignConfig, served: Served | None = None) -> float:
        """Warm the child's model (the one it serves, or ``served`` once swapped in)."""
        self._warm = (max_batch, cfg)
        if served is not None:
            return 0.0  # the child warms it up when it is swapped in
        t0 = time.perf_counter()
        self._request(WARM, _warm_request(max_batch, cfg))
        return time.perf_counter() - t0

    def swap(self, served: Served) -> Served:
        """The child loads ``served``'s spec and serves it from its next batch on."""
        extra = b"" if self._warm is None else _warm_request(*self._warm)
        reply = self._request(SERVE, json.dumps({"spec": served.spec}).encode() + b"\n"
                              + extra)
        if reply["info"] != dict(served.info):
            log.warning("the model process loaded %s, not %s (the checkpoint changed "
                        "meanwhile); its predictions name the one it serves",
                        reply["info"], dict(served.info))
        return super().swap(served)

    def close(self) -> None:
        with self._lock:
            self._proc_gone()


def _warm_request(max_batch: int, cfg: AlignConfig) -> bytes:
    return json.dumps({"max_batch": max_batch, "window_ms": cfg.window_ns // 1_000_000,
                       "hop_ms": cfg.hop_ns // 1_000_000,
                       "sample_rate": cfg.sample_rate}).encode()


# --- the child -------------------------------------------------------------------------


def _warm(predictor: Predictor, request: Mapping[str, Any]) -> float:
    cfg = AlignConfig.from_settings(Settings(window_ms=request["window_ms"],
                                             hop_ms=request["hop_ms"],
                                             sample_rate=request["sample_rate"]))
    return predictor.warm_up(request["max_batch"], cfg)


def child(spec: str, device: str, threads: int, inp: IO[bytes], out: IO[bytes]) -> int:
    """Serve batches read from ``inp`` until it closes."""
    predictor = Predictor(spec, device, threads or None)
    _send(out, json.dumps({"info": dict(predictor.info),
                           "device": str(predictor.device)}).encode())
    while (data := _recv(inp)) is not None:
        kind, body = data[:1], data[1:]
        try:
            if kind == SCORE:
                reply: dict[str, Any] = {"scored": [
                    {"label": s.label, "scores": s.scores, "preprocess_ms": s.preprocess_ms,
                     "model_ms": s.model_ms, "model": dict(s.model or {}),
                     "reused": list(s.reused)} for s in predictor(decode_windows(body))]}
            elif kind == WARM:
                reply = {"took_s": _warm(predictor, json.loads(body))}
            elif kind == SERVE:
                first, _, warm = body.partition(b"\n")
                predictor.swap(predictor.load(json.loads(first)["spec"]))
                if warm:
                    _warm(predictor, json.loads(warm))
                reply = {"info": dict(predictor.info)}
            else:
                reply = {"error": f"unknown request {kind!r}"}
        except Exception as e:  # the worker decides what a failed batch means
            log.exception("model process: request failed")
            reply = {"error": repr(e)[:2000]}
        _send(out, json.dumps(reply).encode())
    return 0


def main(argv: Sequence[str]) -> int:
    spec, device, threads, inp_fd, out_fd = argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s model-process: %(message)s")
    with os.fdopen(int(inp_fd), "rb") as inp, os.fdopen(int(out_fd), "wb") as out:
        return child(spec, device, int(threads), inp, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
