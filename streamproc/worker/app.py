"""The faust worker: the input topics are read in batches into the worker core.

Shape::

    PREFIX.video ─┐
    PREFIX.audio ─┼─> fetch loop, batches ─> WorkerCore ─> WindowOutput
    PREFIX.text  ─┘        │ undecodable / late / capped records   (-> PREFIX.predictions)
                           └─> PREFIX.deadletter (reason in sp-error)

Guarantee (docs/design.md §6): a consumed record is acked only when every window that
needs it has been durably published and its stream's progress recorded
("ack-after-emit"), so offsets never commit past data an unfinished window still needs
and a crash replays exactly that. Progress (last published window per stream) lives in a
compacted topic, APPID-progress; a replacement Aligner resumes from it, so replayed input
does not emit a window again. Order per window: publish output -> record progress -> ack
inputs. The logic is in worker/core.py; this module wires it to faust, and
worker/patches.py holds what the worker changes inside faust and aiokafka.
docs/worker.md explains the choices.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from faust.types.auth import CredentialsT

from streamproc import kafka
from streamproc.align.aligner import AlignConfig
from streamproc.config import Settings, check_worker_ports
from streamproc.errors import UserError
from streamproc.inference.groups import other_groups
from streamproc.inference.outputs import InferenceOutput, SummaryOutput, WindowOutput
from streamproc.inference.predictions import ALIGN_ONLY_MODEL, prediction_headers
from streamproc.inference.predictor import Predictor, Served
from streamproc.inference.process import ProcessPredictor
from streamproc.inference.reload import ModelReloader, Signature, checkpoint_dir, signature
from streamproc.topics import check_topics
from streamproc.wire import codec as wire
from streamproc.worker import patches
from streamproc.worker.core import Consumed, WorkerCore, assigned_input_partitions
from streamproc.worker.interleave import Interleaver
from streamproc.worker.metrics import GAUGES_EVERY_S, ClientFaults, Metrics, update_gauges
from streamproc.worker.progress import (
    ProgressWriter,
    StreamProgress,
    progress_topic,
    read_progress,
)

log = logging.getLogger("streamproc.worker")

#: How often the wall-clock timer polls the aligners (idle deadlines close windows).
TICK_S = 0.1
#: Seconds between the worker's one-line status logs.
STATUS_EVERY_S = 30.0
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: Allocations between the collector's young-generation passes (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000
#: glibc's malloc settings (mallopt): fetch responses of megabytes are made and freed all
#: the time; allocated below 32 MB from a heap that grows 64 MB at a time and gives memory
#: back only past 512 MB free, their pages are reused instead of mapped and faulted in anew.
MALLOC_OPTIONS = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TOP_PAD": (-2, 64 << 20),
                  "M_TRIM_THRESHOLD": (-1, 512 << 20)}


def _glibc(name: str) -> Any:
    """The C library's function ``name``, or None where it has none (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_OPTIONS` where the C library is glibc (False elsewhere, e.g.
    macOS or musl, whose allocator keeps its defaults)."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and all(
        mallopt(option, value) == 1 for option, value in MALLOC_OPTIONS.values())


def trim_heap() -> bool:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``; False
    elsewhere). Milliseconds on a large heap, without the interpreter lock: call it from
    a thread, never on the event loop."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and malloc_trim(0) == 1


#: Seconds between looks at whether input stopped (then the freed heap is handed back).
IDLE_TRIM_S = 10.0


class IdleTrim:
    """When an idle worker hands its freed heap back: once each time its input stops.

    :data:`MALLOC_OPTIONS` keep freed memory for the next fetch; after a backlog or a burst
    that is hundreds of MB the worker no longer needs while its streams are quiet.
    """

    def __init__(self) -> None:
        self._seen: float | None = None
        self._trimmed = True

    def due(self, events_in: float) -> bool:
        """``events_in``: records taken in so far (looked at every :data:`IDLE_TRIM_S`)."""
        if events_in != self._seen:
            self._seen, self._trimmed = events_in, False
            return False
        if self._trimmed:
            return False
        self._trimmed = True
        return True


def settle_heap() -> str:
    """Keep the cyclic garbage collector off what start-up made, run it less often, and
    let malloc reuse big buffers. Returns what it did, for the log.

    Modules, faust, aiokafka and the model live as long as the process, yet every full
    collection walked them all while holding the interpreter: about 140,000 objects in an
    align-only worker, 60-155 ms a pass, 0.7-0.9 s of a 120 s W1 backlog's 6 s read
    (docs/benchmarks.md, *Peers*). Frozen, they are never walked again; a young pass every
    10,000 allocations instead of 700 walks each short-lived record less often. What the
    worker holds at run time (buffered records, windows) is collected as before.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    malloc = (f"malloc reuses freed memory up to {MALLOC_OPTIONS['M_TRIM_THRESHOLD'][1] >> 20} MB"
              if tune_malloc() else "malloc: the C library's defaults (no glibc mallopt)")
    return (f"heap: {gc.get_freeze_count():,} start-up objects frozen (the collector skips "
            f"them); young collections every {GC_YOUNG_THRESHOLD:,} allocations; {malloc}")


def data_dir(settings: Settings) -> Path:
    return Path(settings.data_dir).expanduser() if settings.data_dir else (
        Path.home() / ".cache" / "streamproc" / "worker")


async def enqueue(topic: faust.TopicT, rec: wire.KafkaRecord) -> Awaitable[object]:
    """Put one record in the app's producer's queue; returns its delivery, done once the
    broker has it (acks=all).

    Through the producer, not ``topic.send``: the topic's path adds a pending message, a
    future message, send sensors and a completion callback per record, which cost the
    worker more per window than building its record did, for nothing it uses (records are
    bytes already, and delivery is awaited by the caller)."""
    ts = None if rec.timestamp_ms is None else (rec.timestamp_ms + 0.5) / 1000.0  # exact ms back
    producer = await topic.app.maybe_start_producer()
    return await producer.send(topic.get_topic_name(), rec.key, rec.value, None, ts,
                               list(rec.headers))


async def publish(topic: faust.TopicT, rec: wire.KafkaRecord) -> None:
    """Send one record with the app's producer and wait until the broker has it."""
    await (await enqueue(topic, rec))


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """The security settings as faust's broker credentials (None: plaintext); the other
    clients get the same settings from streamproc.kafka."""
    ctx = settings.security_kwargs().get("ssl_context")
    if settings.sasl_mechanism:
        return faust.SASLCredentials(username=settings.sasl_username,
                                     password=settings.sasl_password, ssl_context=ctx,
                                     mechanism=settings.sasl_mechanism)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


def _faust_app(settings: Settings, partitions: int) -> faust.App:
    return faust.App(
        settings.app_id,
        broker=kafka.faust_brokers(settings),
        broker_credentials=faust_credentials(settings),
        store="memory://",
        autodiscover=False,
        datadir=str(data_dir(settings)),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,  # no extra 1-partition topic in our consumer group
        # No tables here; with standby replicas > 0 faust still uses its own assignor,
        # which gives co-partitioned topics' partitions p to one worker (aiokafka's
        # round-robin, its choice otherwise, does not).
        table_standby_replicas=1,
        # Held (unacked) records are ours to release; never block a rebalance on them, and
        # never let faust ack a record behind our back (it would commit past held ones).
        stream_wait_empty=False,
        stream_ack_exceptions=False,
        stream_ack_cancelled_tasks=False,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_ms / 1000 / 5),
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.max_message_bytes,
        consumer_max_fetch_size=settings.max_message_bytes,
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
    )


def _output(settings: Settings, predictor: Predictor | None, metrics: Metrics,
            topic: faust.TopicT) -> WindowOutput:
    """Micro-batched inference with a predictor, window summaries without one."""
    headers = (("sp-worker", WORKER_ID.encode()),
               *prediction_headers(settings, ALIGN_ONLY_MODEL if predictor is None
                                   else predictor.info))
    if predictor is None:
        return SummaryOutput(functools.partial(enqueue, topic), headers)
    return InferenceOutput(predictor, functools.partial(enqueue, topic),
                           model_info=predictor.info,
                           max_batch=settings.batch_size,
                           max_wait_ms=settings.batch_max_wait_ms, metrics=metrics,
                           headers=headers, current_model=lambda: predictor.info)


def create_app(settings: Settings, *, partitions: int | None = None,
               output: WindowOutput | None = None, predictor: Predictor | None = None,
               metrics: Metrics | None = None) -> faust.App:
    """The worker's faust app; ``app.streamproc`` is its :class:`WorkerCore`.

    ``partitions``: the input topics' partition count (the progress topic gets the
    same, so progress for a stream lives on its stream's partition). With a
    ``predictor`` windows go through micro-batched inference (:class:`InferenceOutput`);
    without one the worker is align-only and publishes window summaries.
    """
    patches.check_versions()
    n = partitions or settings.partitions
    app = _faust_app(settings, n)
    metrics = metrics if metrics is not None else Metrics()
    inputs = app.topic(*settings.input_topics, key_type=bytes, value_type=bytes)
    predictions = app.topic(settings.topic("predictions"), key_type=bytes, value_type=bytes)
    dead_letters = app.topic(settings.topic("deadletter"), key_type=bytes, value_type=bytes)
    # Per stream (key: the stream id, UTF-8), the start of its last published window
    # (value: ASCII decimal ns). Compacted: the latest value per stream stays.
    progress = app.topic(progress_topic(settings), key_type=bytes, value_type=bytes,
                         partitions=n, replicas=settings.replication_factor,
                         compacting=True, deleting=False, internal=True)
    output = output or _output(settings, predictor, metrics, predictions)
    app.streamproc_metrics = metrics  # type: ignore[attr-defined]
    patches.patch_fetcher()
    patches.patch_connections()
    # process-wide, like the patches: the threads' turns on the interpreter (Settings)
    sys.setswitchinterval(settings.switch_interval_us / 1e6)
    client_faults = ClientFaults()
    client_faults.install()

    crashing: list[asyncio.Future] = []

    def crash(exc: BaseException) -> None:
        if not crashing:  # the first error is the one worth reporting
            crashing.append(asyncio.ensure_future(app.crash(exc)))

    async def send_progress(stream_id: str, value: StreamProgress) -> None:
        await publish(progress, wire.KafkaRecord(stream_id.encode("utf-8"), value.encode()))

    progress_writer = ProgressWriter(send_progress, order=attrgetter("seq"))
    # what the fetch loop holds back to interleave a partition's topics by event time
    interleave = Interleaver(settings.input_topics)
    consumer_state = patches.consumer_fetch_state(app)

    def fetch_state(tp: tuple[str, int]) -> tuple[int | None, int | None]:
        end, fetched_ns = consumer_state(tp)
        if fetched_ns is not None and interleave.is_held(tp):
            # not fetched while its records wait in hand: no stalled fetch, no idle pause
            fetched_ns = time.time_ns()
        return end, fetched_ns

    core = WorkerCore(settings, submit=output.submit,
                      send_dead_letter=lambda rec: publish(dead_letters, rec),
                      record_progress=progress_writer.record,
                      forget_progress=progress_writer.forget,
                      on_frame=None if predictor is None else predictor.decode_early,
                      counters=metrics.counters, crash=crash,
                      flowing=lambda: app.flow_control.is_active(),
                      fetch_state=fetch_state,
                      fetch_skips=patches.FETCH_SKIPS)
    app.streamproc = core  # type: ignore[attr-defined]

    async def earliest_offset(tp: tuple[str, int]) -> int:
        return (await app.consumer.earliest_offsets(TP(*tp))).get(TP(*tp)) or 0

    async def seek(tp: tuple[str, int], offset: int) -> None:
        interleave.drop([tp])  # fetched past the hole: read again after it
        await app.consumer.seek(TP(*tp), offset)

    async def on_batch(batch: list[Consumed]) -> None:
        try:
            core.on_records(batch)
            await core.seek_back(earliest_offset, seek)
            await core.wait_for_room()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let faust restart the fetcher with acks in disorder
            log.exception("handling input failed; stopping the worker so a restart replays "
                          "safely")
            await app.crash(exc)
            raise

    # The input topics are subscribed like an agent's, but their records reach the core in
    # batches from the consumer's fetch loop (patches.drain_in_batches), not through a stream.
    app.topics.add(inputs)

    @app.timer(interval=TICK_S)
    async def close_idle_windows() -> None:
        core.on_tick()

    @app.timer(interval=1.0)
    async def client_fault_log() -> None:
        client_faults.tick()

    @app.timer(interval=STATUS_EVERY_S)
    async def status() -> None:
        served = "" if predictor is None else (
            f" model={predictor.info['name']}/{predictor.info['version']}")
        log.info("status: %s%s", core.status_line(), served)

    gauge_failed: list[bool] = []

    @app.timer(interval=GAUGES_EVERY_S)
    async def gauges() -> None:
        # Metrics must never take the worker down: the consumer's numbers are missing
        # around an assignment (highwater None before the first fetch) and its internals
        # may change; a failure is logged once and the gauges keep their last values.
        try:
            update_gauges(app.consumer, core.fetch_state, settings, metrics, core.buffered())
        except Exception:
            if not gauge_failed:
                gauge_failed.append(True)
                log.exception("could not update the gauges (logged once; the worker goes on)")

    @app.task
    async def start_output() -> None:
        await output.start()

    @app.task
    async def settle() -> None:
        # once the worker has started: everything imported and loaded is in the heap
        log.info("%s", settle_heap())

    idle_trim = IdleTrim()

    @app.timer(interval=IDLE_TRIM_S)
    async def give_back_memory() -> None:
        if idle_trim.due(core.counters.get("events_in")):
            await asyncio.to_thread(trim_heap)

    # faust types a signal's receivers as taking *args; these take what faust sends them
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: faust.App, revoked: set, **kwargs: Any) -> None:
        interleave.drop([(tp.topic, tp.partition) for tp in revoked])
        core.on_revoked((tp.topic, tp.partition) for tp in revoked)

    declared: list[bool] = []

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def on_resume(sender: faust.App, **kwargs: Any) -> None:
        # faust is about to resume the assignment (partitions still paused): read every
        # stream's durable progress, so new aligners start after what was published.
        if not declared:
            await progress.maybe_declare()
            declared.append(True)
        core.resume_from(await read_progress(settings))
        core.resuming = True

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: faust.App, assigned: set, **kwargs: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in assigned]
        try:
            parts = assigned_input_partitions(settings, tps)
        except UserError as exc:
            log.error("%s", exc)
            await app.crash(exc)
            return
        patches.take_over(app.consumer, core)  # before any record of it flows
        patches.drain_in_batches(app.consumer, core, on_batch, interleave)
        core.on_assigned(tps)
        log.info("partitions assigned: %s", sorted(parts))

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def drain(sender: faust.App, **kwargs: Any) -> None:
        # Let in-flight windows finish so their inputs are acked before the last commit.
        await output.stop()
        floors = core.stop_revising()
        if floors:
            await asyncio.wait(floors, timeout=30)
        await core.flush_acks(timeout=30)
        log.info("final status: %s", core.status_line())
        try:
            await app.producer.flush()
            # a periodic commit in flight makes the first call only wait for it
            # (faust then returns without committing what was acked since)
            for _ in range(2):
                await app.consumer.commit()
        except Exception as exc:  # best effort: uncommitted input is replayed on restart
            log.warning("final commit failed (%r); records will be replayed", exc)
        left = patches.uncommitted(app.consumer, set(core.modality_of))
        if left:
            log.warning("acked but not committed at shutdown (the next owner replays "
                        "them): %s", left)

    return app


def input_partitions(settings: Settings) -> int:
    """Check the topics (co-partitioned, present) and return the input partition count."""
    states = check_topics(settings)
    n = next(s.partitions for s in states if s.name == settings.topic("video"))
    assert n is not None  # check_topics refuses topics that are missing
    return n


def start_reloader(app: faust.App, reloader: ModelReloader) -> None:
    """Start the hot reload once the worker runs (its log lines then reach the log)."""
    # a plain handler, not the event loop's: it only wakes the reloader's thread
    signal.signal(signal.SIGHUP, lambda _sig, _frame: reloader.trigger())

    @app.task
    async def hot_reload() -> None:
        reloader.start()


def log_when_started(app: faust.App, lines: Iterable[tuple[int, str]]) -> None:
    """Log ``(level, message)`` lines from a task of ``app``: faust sets up logging only
    when its worker starts, and drops anything logged before."""

    @app.task
    async def announce() -> None:
        for level, msg in lines:
            log.log(level, "%s", msg)


def fits_worker(settings: Settings, served: Served) -> list[str]:
    """Why a model cannot serve the windows of a worker already running with ``settings``
    (empty: it can). The aligners' K is fixed once they run: a model wanting another needs
    a restart."""
    k = served.preprocess.frames_per_window
    problems = [] if k == settings.frames_per_window else [
        f"it samples {k} frames per window and the running worker's windows have "
        f"{settings.frames_per_window} (restart the worker to change frames_per_window)"]
    return problems + [m for m in served.preprocess.mismatches(settings)
                       if "frames_per_window" not in m]


def model_reloader(settings: Settings, predictor: Predictor, metrics: Metrics,
                   loaded: Signature) -> ModelReloader | None:
    """The hot reload of the worker's checkpoint directory (None for an import path)."""
    directory = checkpoint_dir(settings.model)
    if directory is None:
        return None
    cfg = AlignConfig.from_settings(settings)

    def check(served: Served) -> None:
        problems = fits_worker(settings, served)
        if problems:
            raise UserError("it does not fit the worker's window settings: "
                            + "; ".join(problems))
        try:
            took = predictor.warm_up(settings.batch_size, cfg, served)
        except Exception as e:  # as at start-up: live windows meet such failures one by one
            log.warning("model reload: warm-up on empty windows failed: %r", e)
        else:
            log.info("model reload: new model warmed up for batches of 1-%d in %.1f s",
                     settings.batch_size, took)

    def on_result(result: str, served: Served) -> None:
        metrics.counters.inc("model_reloads", result=result)
        if result == "ok":
            metrics.serving(served.info)

    return ModelReloader(predictor, directory, poll_s=settings.model_reload_s, check=check,
                         on_result=on_result, loaded=loaded)


def run_worker(settings: Settings) -> int:
    """``streamproc worker``: check topics, load the model, then run until SIGTERM / Ctrl-C."""
    check_worker_ports(settings)  # before anything slow (faust binds its port late)
    n = input_partitions(settings)
    predictor = None
    loaded: Signature = None
    notes: list[tuple[int, str]] = []  # logged once faust has set up logging
    if settings.model:
        # before the load: a checkpoint written during it is then seen as new
        directory = checkpoint_dir(settings.model)
        loaded = signature(directory) if directory is not None else None
        serve = ProcessPredictor if settings.model_in == "process" else Predictor
        predictor = serve(settings.model, settings.device,
                          settings.model_threads or max(1, (os.cpu_count() or 1) - 1))
        k = predictor.preprocess.frames_per_window
        if k != settings.frames_per_window:
            notes.append((logging.INFO, f"frames_per_window: using the model's K={k} "
                                        f"(settings said {settings.frames_per_window})"))
            settings = settings.replace(frames_per_window=k)
        mismatches = predictor.preprocess.mismatches(settings)
        if mismatches:
            raise UserError(f"model {settings.model} does not fit these window settings: "
                            + "; ".join(mismatches) + " (change the settings to match)")
        try:
            took = predictor.warm_up(settings.batch_size, AlignConfig.from_settings(settings))
        except Exception as e:  # it meets such windows live too, where one window fails alone
            notes.append((logging.WARNING, f"model warm-up on empty windows failed: {e!r}"))
        else:
            notes.append((logging.INFO, f"model warmed up for batches of "
                                        f"1-{settings.batch_size} in {took:.1f} s"))
        notes.append((logging.INFO, f"serving model {predictor.info['name']} version "
                                    f"{predictor.info['version']} from {settings.model} on "
                                    f"{predictor.device} ({predictor.threads} CPU thread(s)) "
                                    f"in a {settings.model_in}"
                      + (f" (checkpoint {predictor.info['checkpoint']})"
                         if "checkpoint" in predictor.info else "")))
    else:
        notes.append((logging.WARNING, "NO MODEL: --model is empty, so this worker is "
                      "ALIGN-ONLY: its predictions are window summaries with empty labels "
                      "and scores. Give --model a checkpoint (`streamproc demo` trains one "
                      "into ~/.cache/streamproc/demo/model) to get labels."))
    bound_ms = settings.final_within_ns() // 1_000_000
    if settings.final_within_ms < 0 and bound_ms:
        notes.append((logging.INFO, f"finals: at most {bound_ms} ms after their provisional "
                                    "(final_within_ms auto); later transcript segments "
                                    "revise them"))
    model_info = predictor.info if predictor is not None else ALIGN_ONLY_MODEL
    notes += [(logging.WARNING, line) for line in other_groups(settings, model_info)]
    metrics = Metrics()
    try:
        metrics.serve(settings.metrics_port)
    except OSError as e:
        raise UserError(f"cannot serve metrics on port {settings.metrics_port}: {e} "
                        "(--metrics-port 0 turns the endpoint off)") from None
    reloader = None
    if predictor is not None:
        metrics.serving(predictor.info)
        reloader = model_reloader(settings, predictor, metrics, loaded)
        if reloader is None:
            notes.append((logging.INFO, f"hot reload: off ({settings.model} is not a "
                                        "checkpoint directory)"))
    app = create_app(settings, partitions=n, predictor=predictor, metrics=metrics)
    if reloader is not None:
        every = (f"every {settings.model_reload_s:g} s and " if settings.model_reload_s > 0
                 else "")
        notes.append((logging.INFO, f"hot reload: a new checkpoint in {reloader.directory} is "
                                    f"served without a restart (looked for {every}on SIGHUP)"))
        start_reloader(app, reloader)
    notes.insert(0, (logging.INFO, f"worker {WORKER_ID}: app {settings.app_id} on "
                                   f"{settings.bootstrap_servers}, {n} partitions; threads "
                                   f"switch every {sys.getswitchinterval() * 1e6:.0f} us"))
    log_when_started(app, notes)
    faust_worker(app, settings.log_level).execute_from_commandline()  # exits the process
    return 0


def faust_worker(app: faust.App, log_level: str) -> Any:
    """faust's Worker for ``app``, logging at ``log_level``, without its terminal spinner.

    At ``warning`` and above faust's spinner sets the root logger to DEBUG and filters in
    its own handler, so every library's debug call on the hot path (faust's and
    aiokafka's, a few per published record) would build a log record only to drop it.
    """
    from faust.worker import Worker

    worker = Worker(app, loglevel=log_level.upper(), quiet=True)
    worker.spinner = None
    return worker
