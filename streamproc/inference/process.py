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
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from streamproc.align.aligner import AlignConfig, Window
from streamproc.config import Settings
from streamproc.inference.predictor import Predictor, Scored, Served, load_served
from streamproc.wire.codec import TranscriptSegment, VideoFrame, Word

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
            # as the aligner cut them: a word may reach past its segment's clipped span
            "segments": [[s.seq, s.text, s.start_ns, s.end_ns, s.final, s.confidence, s.lang,
                          None if s.words is None else
                          [[x.text, x.start_ns, x.end_ns] for x in s.words]]
                         for s in w.segments],
            "present": w.present, "quality": w.quality, "rev": w.rev, "final": w.final,
            "unchanged": w.unchanged})
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
        segments = [TranscriptSegment(sid, seq, text, start, end, final, confidence, lang,
                                      words=None if words is None else
                                      tuple(Word(*x) for x in words))
                    for seq, text, start, end, final, confidence, lang, words in h["segments"]]
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


class ModelDied(RuntimeError):
    """The model process exited or stopped answering; it is started again for the next
    request."""


def _frame(kind: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """A request as its header (length, kind) and its payload, written one after the other
    (a batch's payload is megabytes: not copied once more to prefix it)."""
    return _LEN.pack(len(kind) + len(payload)) + kind, payload


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError
        try:
            view = view[os.write(fd, view):]  # non-blocking: what fits in the pipe now
        except BlockingIOError:
            continue


def _read_exactly(fd: int, n: int, deadline: float) -> bytes | None:
    """``n`` bytes, or None when the other side closed its end first."""
    parts, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# --- the worker's side -----------------------------------------------------------------

#: How long the child may take to answer a batch, and to start or load a model (s): past
#: it the child is taken for hung, killed, and started again for the next request.
SCORE_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 600.0


class ProcessPredictor(Predictor):
    """A :class:`Predictor` whose batches run in a child process.

    Its own copy of the model (loaded here on the CPU, never called) tells the worker what
    it serves; the child loads the same model on ``device`` and scores every batch. A
    checkpoint directory is copied first and both load the copy, so a child started again
    serves exactly what the worker says it serves, whatever the directory holds by then.
    """

    def __init__(self, spec: str, device: str = "auto", threads: int | None = None) -> None:
        self._snapshots: set[str] = set()
        super().__init__(self._snapshot(spec), "cpu", threads)
        self.spec = spec  # where a hot reload looks (the copy is what is served)
        self._args = (str(device), str(threads or 0))
        self._lock = threading.Lock()  # one request at a time: the model thread, a reload
        self._warm: tuple[int, AlignConfig] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: int | None = None
        self._from: int | None = None
        self._exit: int | None = None  # the exit code of the last child, once it is gone
        self._closed = False
        self._start(self.served.spec)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _snapshot(self, spec: str) -> str:
        """A private copy of a checkpoint directory's files (an import path as it is)."""
        from streamproc.inference.reload import _files, checkpoint_dir

        directory = checkpoint_dir(spec)
        if directory is None:
            return spec
        copy = tempfile.mkdtemp(prefix="streamproc-model-")
        self._snapshots.add(copy)
        for name in _files():
            shutil.copy2(directory / name, Path(copy) / name)
        return copy

    def _forget_snapshots(self, keep: str | None) -> None:
        for copy in self._snapshots - {keep}:
            shutil.rmtree(copy, ignore_errors=True)
        self._snapshots &= {keep}

    def _start(self, spec: str) -> None:
        import torch  # loaded by the Predictor already (an align-only worker never is one)

        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        device, threads = self._args
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "streamproc.inference.process", spec, device, threads,
             str(to_r), str(from_w)], pass_fds=(to_r, from_w),
            # a terminal's Ctrl-C is the worker's to handle: the child ends when its pipe
            # closes, after the worker's last batch
            start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        os.set_blocking(to_w, False)  # a batch bigger than the pipe never blocks past its timeout
        self._to, self._from = to_w, from_r
        ready = self._answer(LOAD_TIMEOUT_S)
        if ready["info"] != dict(self.served.info):
            self._gone()
            raise ModelDied(f"the model process loaded {ready['info']}, not "
                            f"{dict(self.served.info)}")
        self.device = torch.device(ready["device"])  # where the batches run
        log.info("model process %d serves %s on %s", self._proc.pid, ready["info"],
                 self.device)

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self._from is not None
        deadline = time.monotonic() + timeout
        try:
            head = _read_exactly(self._from, _LEN.size, deadline)
            data = None if head is None else _read_exactly(self._from, _LEN.unpack(head)[0],
                                                            deadline)
        except TimeoutError:
            self._gone()
            raise ModelDied(f"the model process did not answer within {timeout:g} s "
                            "(killed)") from None
        if data is None:
            self._gone()
            raise ModelDied(f"the model process exited (code {self._exit})")
        reply: dict[str, Any] = json.loads(data)
        if "error" in reply:
            raise RuntimeError(f"model process: {reply['error']}")
        return reply

    def _request(self, kind: bytes, payload: bytes, timeout: float) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the model process was closed")
            if self._proc is None or self._proc.poll() is not None:
                self._restart()
            request = _frame(kind, payload)
            try:
                self._write(request, timeout)
            except BrokenPipeError:  # gone before it read this: a new one computes it
                self._restart()
                self._write(request, timeout)
            try:
                return self._answer(timeout)
            except ModelDied as e:
                raise ModelDied(f"{e} during a request; it is started again for the next "
                                "one") from None

    def _write(self, parts: Sequence[bytes], timeout: float) -> None:
        assert self._to is not None
        deadline = time.monotonic() + timeout
        try:
            for part in parts:
                _write_all(self._to, part, deadline)
        except TimeoutError:
            self._gone()
            raise ModelDied(f"the model process read nothing for {timeout:g} s "
                            "(killed)") from None

    def _gone(self) -> None:
        """Close the pipes, kill the child if it still runs, and reap it."""
        for fd in (self._to, self._from):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to = self._from = None
        if self._proc is not None:
            self._proc.kill()
            self._exit = self._proc.wait()
        self._proc = None

    def _restart(self) -> None:
        self._gone()
        log.warning("model process gone (exit code %s): starting it again", self._exit)
        self._start(self.served.spec)
        if self._warm is not None:
            try:
                self._write(_frame(WARM, _warm_request(*self._warm)), LOAD_TIMEOUT_S)
                self._answer(LOAD_TIMEOUT_S)
            except RuntimeError as e:  # a cold model still scores
                log.warning("model process: warm-up after the restart failed: %s", e)

    def __call__(self, windows: Sequence[Window]) -> list[Scored]:
        reply = self._request(SCORE, encode_windows(windows), SCORE_TIMEOUT_S)
        return [Scored(s["label"], s["scores"], s["preprocess_ms"], s["model_ms"], s["model"],
                       tuple(s["reused"])) for s in reply["scored"]]

    def load(self, spec: str | None = None) -> Served:
        """A copy of the checkpoint loaded here on the CPU (what it says about itself); the
        child loads the same copy where it runs when it is swapped in."""
        copy = self._snapshot(spec or self.spec)
        return load_served(copy, "cpu")

    def decode_early(self, frame: VideoFrame) -> None:
        """Nothing: the child decodes a batch's frames itself."""

    def warm_up(self, max_batch: int, cfg: AlignConfig, served: Served | None = None) -> float:
        """Warm the child's model (the one it serves, or ``served`` when it is swapped in)."""
        self._warm = (max_batch, cfg)
        if served is not None:
            return 0.0  # the child warms it up before it swaps it in
        t0 = time.perf_counter()
        self._request(WARM, _warm_request(max_batch, cfg), LOAD_TIMEOUT_S)
        return time.perf_counter() - t0

    def swap(self, served: Served) -> Served:
        """The child loads ``served`` (and warms it up), then serves it from its next batch
        on; if it cannot, this raises and both go on with the model served now."""
        extra = b"" if self._warm is None else _warm_request(*self._warm)
        reply = self._request(SERVE, json.dumps({"spec": served.spec}).encode() + b"\n"
                              + extra, LOAD_TIMEOUT_S)
        if reply["info"] != dict(served.info):  # the same copy: only a bug gets here
            raise RuntimeError(f"the model process loaded {reply['info']}, not "
                               f"{dict(served.info)}")
        old = super().swap(served)
        self._forget_snapshots(served.spec)
        return old

    def close(self) -> None:
        """Stop the child for good (and remove the checkpoint copies)."""
        with self._lock:
            self._closed = True
            self._gone()
            self._forget_snapshots(None)


def _warm_request(max_batch: int, cfg: AlignConfig) -> bytes:
    return json.dumps({"max_batch": max_batch, "window_ms": cfg.window_ns // 1_000_000,
                       "hop_ms": cfg.hop_ns // 1_000_000,
                       "sample_rate": cfg.sample_rate}).encode()


# --- the child -------------------------------------------------------------------------


def _warm(predictor: Predictor, request: Mapping[str, Any], served: Served | None = None
          ) -> float:
    cfg = AlignConfig.from_settings(Settings(window_ms=request["window_ms"],
                                             hop_ms=request["hop_ms"],
                                             sample_rate=request["sample_rate"]))
    return predictor.warm_up(request["max_batch"], cfg, served)


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
            elif kind == SERVE:  # load, warm up, and only then serve it
                first, _, warm = body.partition(b"\n")
                served = predictor.load(json.loads(first)["spec"])
                if warm:
                    _warm(predictor, json.loads(warm), served)
                predictor.swap(served)
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
