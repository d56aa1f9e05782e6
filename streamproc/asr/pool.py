"""Where ``streamproc asr`` decodes: in its own process, or in a pool of decoding processes.

pocketsphinx holds the GIL while it decodes, so one process decodes one utterance at a
time however many threads it has: streams that speak at once queue behind each other.
A pool of processes decodes as many utterances at once as it has processes.

Both are driven alike by the worker (the Kafka shell), per stream *handle*: ``open``,
``add`` audio (already 16 kHz mono, with its event time and Kafka offset), ``flush``,
``close``; each ``add`` and ``flush`` gives one :class:`Result` with the segments it made
(wire-encoded, ready to send) and the stream's state afterwards (checkpoint, the oldest
offset it still needs, whether an utterance is open), handed to the ``on_results``
callback given to :meth:`Decoding.start`: at once on the caller's thread when decoding is
local, on the pool's receiving thread as results come back otherwise. The worker
publishes a result's segments before it takes the state into a commit, so the guarantees
of docs/asr.md hold whatever the pool does in between.

Affinity: a handle lives in one process from ``open`` to ``close``, and requests reach a
process in the order they were made, so a stream's audio is decoded in order by one
recogniser. Results of different handles may come back in any order.

Only plain values cross the process boundary (ints, strings, bytes of 16 kHz PCM,
wire-encoded segments): records from Kafka are decoded and checked in the worker, never
handed to a decoding process as they came.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection as mpc
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamproc.asr.engine import Engine, load_engine
from streamproc.asr.stream import Checkpoint, CutConfig, StreamTranscriber
from streamproc.asr.vad import make_vad
from streamproc.errors import UserError
from streamproc.wire import codec as wire

log = logging.getLogger("streamproc.asr")

FLUSHED = -1  # the token of a flush's result (an add's is its record's offset)
# Decoders each process loads before its first utterance (~0.3 s and ~90 MB each with
# pocketsphinx): one per stream in an utterance at the same time, more are loaded if needed.
DECODERS_AT_START = 2
START_TIMEOUT_S = 180.0

_OPEN, _ADD, _FLUSH, _CLOSE, _STOP = "open", "add", "flush", "close", "stop"


class DecodingError(RuntimeError):
    """A decoding process ended: the worker stops with the audio it was given uncommitted."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """A segment as the producer sends it, and what the worker logs and counts of it."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    final: bool
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class Result:
    handle: int
    token: int  # the offset of the record added, or FLUSHED
    segments: tuple[Encoded, ...]
    checkpoint: Checkpoint | None
    needed: int | None  # the oldest offset the stream still needs (its audio since checkpoint)
    in_utterance: bool
    position_ns: int | None  # event time just after the stream's last sample
    cpu_s: float  # CPU time the transcriber took
    error: str | None = None  # the add failed (a bug): the record is skipped


def pcm_bytes(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, "<i2").tobytes()


class Host:
    """The transcribers of one decoding process (or of the worker's own), by handle."""

    def __init__(self, engine: Engine, cut: CutConfig, vad: str, vad_mode: int) -> None:
        self.engine = engine
        self.cut = cut
        self.vad = vad
        self.vad_mode = vad_mode
        self.streams: dict[int, StreamTranscriber] = {}

    def handle(self, req: tuple) -> tuple | None:
        """One request; the plain-value result of an add or a flush, else None."""
        op, h = req[0], req[1]
        if op == _OPEN:
            sid, resume = req[2], req[3]
            self.streams[h] = StreamTranscriber(
                sid, self.cut, self.engine, make_vad(self.vad, self.vad_mode),
                Checkpoint(*resume) if resume is not None else None)
            return None
        if op == _CLOSE:
            tr = self.streams.pop(h, None)
            if tr is not None:
                tr.close()
            return None
        tr = self.streams[h]
        t0 = time.process_time()
        error = None
        try:
            if op == _ADD:
                token = req[2]
                segs = tr.add_pcm(req[3], np.frombuffer(req[4], "<i2"), token)
            else:
                token = FLUSHED
                segs = tr.flush()
        except Exception as e:  # a bug must not stop every other stream
            segs = []
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        cpu = time.process_time() - t0
        return (h, token, [_encode(s) for s in segs], _plain(tr.checkpoint), tr.needed_token,
                tr.in_utterance, tr.position_ns, cpu, error)


def _plain(cp: Checkpoint | None) -> tuple[int, int, int | None] | None:
    """A checkpoint as plain values, to cross a process boundary."""
    return None if cp is None else (cp.next_seq, cp.epoch_ns, cp.flush_at_ns)


def _encode(seg: wire.TranscriptSegment) -> tuple:
    key, value, headers, ts_ms = wire.encode_parts(seg)
    return (key, value, headers, ts_ms, seg.final, seg.seq, seg.text)


def _result(msg: tuple) -> Result:
    h, token, segs, cp, needed, in_utt, pos, cpu, error = msg
    return Result(h, token, tuple(Encoded(*s) for s in segs),
                  None if cp is None else Checkpoint(*cp), needed, in_utt, pos, cpu, error)


OnResults = Callable[[list["Result"]], None]
OnError = Callable[[BaseException], None]


class Decoding:
    """The interface the worker drives; results go to the ``on_results`` of :meth:`start`."""

    processes = 0

    def start(self, on_results: OnResults, on_error: OnError) -> None:
        raise NotImplementedError

    def open(self, handle: int, stream_id: str, resume: Checkpoint | None) -> None:
        raise NotImplementedError

    def add(self, handle: int, token: int, ts_ns: int, pcm: bytes) -> None:
        raise NotImplementedError

    def flush(self, handle: int) -> None:
        raise NotImplementedError

    def close(self, handle: int) -> None:
        raise NotImplementedError

    @property
    def in_flight(self) -> int:
        """Adds and flushes whose result has not been handed to ``on_results`` yet."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class LocalDecoding(Decoding):
    """Decoding on the worker's own thread: each request is done when it is made."""

    def __init__(self, engine: Engine, cut: CutConfig, vad: str, vad_mode: int) -> None:
        self.host = Host(engine, cut, vad, vad_mode)
        self._on_results: OnResults | None = None

    def start(self, on_results: OnResults, on_error: OnError) -> None:
        self._on_results = on_results

    def open(self, handle: int, stream_id: str, resume: Checkpoint | None) -> None:
        self.host.handle((_OPEN, handle, stream_id, _plain(resume)))

    def add(self, handle: int, token: int, ts_ns: int, pcm: bytes) -> None:
        self._do((_ADD, handle, token, ts_ns, pcm))

    def flush(self, handle: int) -> None:
        self._do((_FLUSH, handle))

    def close(self, handle: int) -> None:
        self.host.handle((_CLOSE, handle))

    def _do(self, req: tuple) -> None:
        out = self.host.handle(req)
        assert out is not None and self._on_results is not None
        self._on_results([_result(out)])

    @property
    def in_flight(self) -> int:
        return 0

    def shutdown(self) -> None:
        for h in list(self.host.streams):
            self.host.handle((_CLOSE, h))


class _Child:
    def __init__(self, index: int, proc: Any, conn: mpc.Connection) -> None:
        self.index = index
        self.proc = proc
        self.conn = conn
        self.handles = 0  # streams open in it (new ones go to the process with fewest)
        self.in_flight = 0
        self.outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        # The worker never blocks on a full pipe: a process that is sending results
        # while the worker sends it audio would otherwise wait on each other for ever.
        self.sender = threading.Thread(target=self._send, name=f"asr-send-{index}",
                                       daemon=True)
        self.sender.start()

    def _send(self) -> None:
        while (req := self.outbox.get()) is not None:
            try:
                self.conn.send(req)
            except (OSError, ValueError):
                return  # the process is gone; the worker hears it on the result side


class ProcessPool(Decoding):
    """``processes`` decoding processes, each with the engine loaded once at start-up."""

    def __init__(self, processes: int, engine_spec: str, cut: CutConfig, vad: str,
                 vad_mode: int, decoders_at_start: int = DECODERS_AT_START) -> None:
        # spawn, not fork: the worker's Kafka clients run threads a fork would copy mid-state
        ctx = multiprocessing.get_context("spawn")
        self.processes = processes
        self._children: list[_Child] = []
        self._where: dict[int, _Child] = {}
        self._count_lock = threading.Lock()  # in-flight counts: the receiver lowers them
        self._stopping = threading.Event()
        self._receiver: threading.Thread | None = None
        started = []
        try:
            for i in range(processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_child_main, name=f"asr-decoder-{i}", daemon=True,
                                   args=(child, engine_spec, cut, vad, vad_mode,
                                         decoders_at_start))
                proc.start()
                child.close()
                started.append((proc, parent))
            deadline = time.monotonic() + START_TIMEOUT_S
            for i, (proc, conn) in enumerate(started):
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise DecodingError(f"decoding process {i} was not ready after "
                                        f"{START_TIMEOUT_S:.0f} s")
                try:
                    msg = conn.recv()
                except EOFError:
                    proc.join(5)
                    raise DecodingError(f"decoding process {i} ended at start-up (exit code "
                                        f"{proc.exitcode})") from None
                if msg[0] == "error":
                    raise UserError(f"asr engine {engine_spec!r} cannot load: {msg[1]}")
                self._children.append(_Child(i, proc, conn))
        except BaseException:
            for proc, conn in started:
                conn.close()
                proc.terminate()
            raise
        log.info("decoding in %d processes (pids %s), %d decoders loaded in each", processes,
                 ", ".join(str(c.proc.pid) for c in self._children), decoders_at_start)

    def start(self, on_results: OnResults, on_error: OnError) -> None:
        self._receiver = threading.Thread(target=self._receive, args=(on_results, on_error),
                                          name="asr-receive", daemon=True)
        self._receiver.start()

    def _receive(self, on_results: OnResults, on_error: OnError) -> None:
        """Hand results on as they come back, until shutdown or a process ends."""
        by_conn = {c.conn: c for c in self._children}
        try:
            while not self._stopping.is_set():
                for conn in mpc.wait(list(by_conn), 0.5):
                    child = by_conn[conn]  # type: ignore[index]
                    batch = []
                    try:
                        while child.conn.poll():
                            batch.append(_result(child.conn.recv()))
                    except (EOFError, OSError):
                        if self._stopping.is_set():
                            return
                        child.proc.join(1)
                        raise DecodingError(
                            f"decoding process {child.index} (pid {child.proc.pid}) ended "
                            f"with exit code {child.proc.exitcode}") from None
                    with self._count_lock:
                        child.in_flight -= len(batch)
                    on_results(batch)
        except BaseException as e:
            on_error(e)

    def open(self, handle: int, stream_id: str, resume: Checkpoint | None) -> None:
        child = min(self._children, key=lambda c: (c.handles, c.in_flight, c.index))
        child.handles += 1
        self._where[handle] = child
        child.outbox.put((_OPEN, handle, stream_id, _plain(resume)))

    def add(self, handle: int, token: int, ts_ns: int, pcm: bytes) -> None:
        child = self._where[handle]
        with self._count_lock:
            child.in_flight += 1
        child.outbox.put((_ADD, handle, token, ts_ns, pcm))

    def flush(self, handle: int) -> None:
        child = self._where[handle]
        with self._count_lock:
            child.in_flight += 1
        child.outbox.put((_FLUSH, handle))

    def close(self, handle: int) -> None:
        child = self._where.pop(handle, None)
        if child is not None:
            child.handles -= 1
            child.outbox.put((_CLOSE, handle))

    @property
    def in_flight(self) -> int:
        with self._count_lock:
            return sum(c.in_flight for c in self._children)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.join(2)
        for c in self._children:
            c.outbox.put((_STOP, 0))
            c.outbox.put(None)
        deadline = time.monotonic() + timeout
        for c in self._children:
            c.proc.join(max(0.1, deadline - time.monotonic()))
            if c.proc.is_alive():
                c.proc.terminate()
                c.proc.join(5)
            c.conn.close()


def _child_main(conn: mpc.Connection, engine_spec: str, cut: CutConfig, vad: str,
                vad_mode: int, decoders: int) -> None:
    # Ctrl-C reaches the whole process group; the worker decides when decoding stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = load_engine(engine_spec)
        prepare = getattr(engine, "prepare", None)
        if callable(prepare):
            prepare(decoders)
        host = Host(engine, cut, vad, vad_mode)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            req = conn.recv()
            if req[0] == _STOP:
                return
            out = host.handle(req)
            if out is not None:
                conn.send(out)
    except (EOFError, OSError):
        return  # the worker is gone (kill -9 included): nothing here is worth finishing


def resolve_processes(value: str) -> int:
    """``asr_processes`` as a count: ``auto`` is one per CPU this process may run on."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return int(value)


def make_decoding(processes: int, engine_spec: str, cut: CutConfig, vad: str,
                  vad_mode: int) -> Decoding:
    """``processes`` 0: in the worker's own process; else a pool of that many."""
    if processes == 0:
        try:
            engine = load_engine(engine_spec)
        except ImportError as e:
            raise UserError(f"asr engine {engine_spec!r} cannot load: {e}") from None
        prepare = getattr(engine, "prepare", None)
        if callable(prepare):
            prepare(DECODERS_AT_START)
        return LocalDecoding(engine, cut, vad, vad_mode)
    return ProcessPool(processes, engine_spec, cut, vad, vad_mode)
