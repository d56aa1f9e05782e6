"""One settings object for every streamproc command.

Precedence, lowest to highest: built-in default < environment (``STREAMPROC_*``) < CLI flag.
Every field documents itself (help text, env var, flag), so ``streamproc config`` and
the README table are generated from the same place and cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from streamproc.errors import UserError

# The sp-mod values of wire format v1, here rather than in the codec so that reading
# settings imports no numpy. A Literal, not an Enum: modalities key the aligner's
# per-record dicts, where plain strings hash and compare fastest.
Modality = Literal["video", "audio", "text"]
MODALITIES: tuple[Modality, ...] = get_args(Modality)


class ConfigError(UserError, ValueError):
    """A setting has a value that cannot work; the message names the setting."""


def _opt(default: Any, help: str, env: str | None = None, secret: bool = False,
         choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "env": env, "secret": secret,
                                            "choices": choices})


# What the auto bound leaves for a provisional's own delay past its modalities' lateness
# (the chunk that moves the audio watermark, the 100 ms poll, the model), so that a final
# lands about the slow modality's lateness after its window's end (docs/benchmarks.md).
FINAL_WITHIN_MARGIN_MS = 200

LOG_LEVELS = ("debug", "info", "warning", "error")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
ASR_VADS = ("webrtc", "energy")
MODEL_IN = ("thread", "process")


@dataclass(frozen=True)
class Settings:
    # --- Kafka connection -------------------------------------------------------------
    bootstrap_servers: str = _opt(
        "localhost:9092", "Kafka bootstrap servers, comma separated.", env="STREAMPROC_BOOTSTRAP"
    )
    security_protocol: str = _opt(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (passed to every client).",
        choices=SECURITY_PROTOCOLS,
    )
    sasl_mechanism: str = _opt("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; required by "
                               "SASL_PLAINTEXT and SASL_SSL, refused otherwise.",
                               choices=SASL_MECHANISMS)
    sasl_username: str = _opt("", "SASL user name.")
    sasl_password: str = _opt("", "SASL password (never printed).", secret=True)
    ssl_cafile: str = _opt("", "CA bundle for SSL.")
    ssl_certfile: str = _opt("", "Client certificate for SSL.")
    ssl_keyfile: str = _opt("", "Client key for SSL.")
    # --- topics ----------------------------------------------------------------------
    topic_prefix: str = _opt("streamproc", "Prefix of every topic: PREFIX.video, PREFIX.audio, ...")
    partitions: int = _opt(4, "Partitions of every streamproc topic (they must all be equal).")
    replication_factor: int = _opt(1, "Replication factor for topics that `topics create` makes.")
    max_message_bytes: int = _opt(
        8 * 1024 * 1024,
        "Largest record (bytes). Sets topic max.message.bytes, producer max_request_size "
        "and consumer fetch sizes together.",
    )
    # --- windows (docs/design.md §3) -------------------------------------------------
    window_ms: int = _opt(1000, "Window length W in milliseconds of event time.")
    hop_ms: int = _opt(500, "Window hop H in milliseconds (H = W gives tumbling windows).")
    # A stream's frames and chunks come in order from one producer (Kafka keeps a
    # partition's order), so lateness only absorbs reordering between producers; every
    # millisecond of it delays each window's first answer (docs/benchmarks.md).
    lateness_video_ms: int = _opt(100, "Allowed lateness of video frames (ms).")
    lateness_audio_ms: int = _opt(
        100, "Allowed lateness of audio chunks (ms); at least one chunk (100 ms by default).")
    lateness_text_ms: int = _opt(3000, "Allowed lateness of transcript segments (ms); ASR lags.")
    idle_deadline_video_ms: int = _opt(
        1000, "Video silent this long (ms, wall clock): its watermark moves on with the clock.")
    idle_deadline_audio_ms: int = _opt(
        1000, "Audio silent this long (ms, wall clock): its watermark moves on with the clock.")
    idle_deadline_text_ms: int = _opt(
        1000, "Transcripts silent this long (ms, wall clock): their watermark moves on with "
        "the clock. lateness_text_ms + this must cover the longest segment.")
    expected_modalities: str = _opt(
        "video,audio,text", "Modalities a window waits for, comma separated."
    )
    provisional_on: str = _opt(
        "video,audio", "When these modalities of a window are complete, publish a provisional "
        "prediction before the others (the transcript) are; none (or empty): final "
        "predictions only.")
    final_within_ms: int = _opt(
        -1, "A window's final prediction waits for the modalities not in provisional_on (the "
        "transcript) at most this long (ms) after its provisional one went out (time in "
        "which the worker is behind its input counts at most 250 ms); segments that come "
        "later revise it (within revision_horizon_ms). 0: it waits for their watermark "
        "plus lateness. -1 (auto): lateness_text_ms minus the provisional modalities' "
        "lateness minus 200 ms, so a final comes about lateness_text_ms after its window's "
        "end; 0 unless the transcript is the only modality outside provisional_on and "
        "revisions are on.")
    revision_horizon_ms: int = _opt(
        10_000, "A transcript segment that arrives after its window's final prediction, "
        "for a window that ended at most this long (ms of event time) before the newest "
        "closed one, revises that prediction (rev + 1) instead of becoming a late dead "
        "letter. Input commits are held back by as much; 0: no revisions.")
    frames_per_window: int = _opt(8, "K: frames sampled evenly from each window for the model.")
    sample_rate: int = _opt(16000, "Audio rate (Hz) windows are resampled to for the model.")
    max_buffer_frames: int = _opt(600, "Cap on buffered video frames per stream.")
    max_buffer_audio_s: float = _opt(60.0, "Cap on buffered audio seconds per stream.")
    max_future_ms: int = _opt(
        60_000, "Records whose event time (the end, for a span) is further ahead of the "
        "worker's clock are dead-lettered (a producer clock is wrong); a modality whose "
        "records come further behind than this is not followed as a lagging source (its "
        "clock stepped back). 0: no limit, and the worker's clock is not compared with "
        "event times at all.")
    max_lead_ms: int = _opt(
        2000, "How far one record may end ahead of both the worker's clock and every "
        "watermark of its stream (ms); records further ahead are dead-lettered, so one "
        "cannot make the stream's real data late (a stream's first record is held to "
        "max_future_ms only); 0 (or max_future_ms 0): no limit.")
    max_span_audio_ms: int = _opt(
        5000, "Longest audio chunk (ms); longer ones are dead-lettered; 0: no limit but "
        "max_buffer_audio_s.")
    max_span_text_ms: int = _opt(
        30_000, "Longest transcript segment (ms); longer ones are dead-lettered; 0: no limit "
        "but max_buffer_audio_s.")
    max_frame_pixels: int = _opt(
        4096 * 2160, "Most pixels (sp-w x sp-h) in one frame; larger frames are "
        "dead-lettered before anything decodes them (default: DCI 4K).")
    stream_expiry_ms: int = _opt(
        300_000, "A stream with no open window and no record for this long (ms) is "
        "forgotten by the aligner; a later record starts it afresh (one that belongs to "
        "windows already closed is still late); 0: never.")
    # --- model and inference -----------------------------------------------------------
    model: str = _opt(
        "",
        "Checkpoint directory/file, or `package.module:factory` for a user model. "
        "Empty: no model, the worker is align-only (window summaries, empty labels).",
    )
    batch_size: int = _opt(32, "Largest micro-batch of windows sent to the model at once.")
    batch_max_wait_ms: int = _opt(
        0, "Longest a window waits for its micro-batch to fill (ms). 0: a batch takes the "
           "windows already waiting and starts at once; those that close while the model "
           "computes fill the next one, so batches still grow under load.")
    device: str = _opt("auto", "auto (CUDA when available), cpu or cuda.")
    model_threads: int = _opt(
        0, "Threads torch runs the model with on the CPU; 0: one less than the CPU count "
        "(at least 1), so the event loop keeps a core (with every core, torch's threads "
        "and the loop take turns on a busy machine and batches wait).")
    model_in: str = _opt(
        "thread", "Where the model runs: thread (a thread of the worker's process) or "
        "process (a child process of its own, fed through a pipe: the model then never "
        "waits for the interpreter while the event loop works, but costs more CPU: it "
        "decodes its frames when a batch comes; for a worker with a core to spare). A hot "
        "reload pauses a process's scoring while it loads the new checkpoint.",
        choices=MODEL_IN)
    model_reload_s: float = _opt(
        5.0, "How often (s) the worker looks for a new checkpoint in its `model` directory "
        "and hot-reloads it (no restart; a bad one is refused and the served model goes on); "
        "0: only on SIGHUP.")
    # --- worker ----------------------------------------------------------------------
    app_id: str = _opt("streamproc", "Consumer group / faust app id shared by all workers; "
                       "every Kafka client's id names it too (streamproc-ROLE-APPID).")
    data_dir: str = _opt(
        "", "Worker state directory (faust's datadir). Empty: ~/.cache/streamproc/worker."
    )
    metrics_port: int = _opt(9109, "Port of the worker's Prometheus /metrics endpoint (0: off).")
    web_port: int = _opt(6066, "Port of faust's own web server (0: off).")
    session_timeout_ms: int = _opt(
        10000,
        "How long a worker that stopped heartbeating (crashed, killed) keeps its partitions "
        "before the group hands them to another worker (ms; brokers allow 6000 and up).",
    )
    switch_interval_us: int = _opt(
        1000, "How long (µs) one of the worker's threads keeps the interpreter while another "
        "waits for it (Python's sys.setswitchinterval; its own default is 5000). The event "
        "loop, the Kafka consumer's thread and the model thread take turns: with 5000, the "
        "model thread waits up to 5 ms after each torch call while the loop works, and a "
        "burst of windows queues behind it.")
    # --- speech recognition (`streamproc asr`) -------------------------------------------
    asr_engine: str = _opt(
        "streamproc.asr.engine:pocketsphinx_engine", "Speech recogniser of `streamproc asr`: "
        "`package.module:factory` (docs/asr.md); the default is pocketsphinx with the "
        "English model its wheel ships.")
    asr_processes: str = _opt(
        "auto", "Decoding processes of `streamproc asr` (each stream's utterances are decoded "
        "in one of them, in order): a number, auto (one per CPU core), or 0 to decode on "
        "the consumer's own thread.")
    asr_vad: str = _opt("webrtc", "Voice activity detector cutting utterances: webrtc "
                        "(pocketsphinx's webrtc-style detector) or energy (a loudness gate).",
                        choices=ASR_VADS)
    asr_vad_mode: int = _opt(2, "Aggressiveness of the webrtc detector, 0 (keeps most "
                             "audio as speech) to 3 (strict).")
    asr_partial_interval_ms: int = _opt(
        1000, "A partial transcript segment (final false) every this many ms of an "
        "utterance's audio; 0: finals only.")
    asr_end_silence_ms: int = _opt(
        500, "Audio without voice this long (ms) ends an utterance: its final segment.")
    asr_max_utterance_ms: int = _opt(
        15_000, "Longest utterance (ms of audio): longer speech is cut into several finals.")
    asr_gap_ms: int = _opt(
        1000, "A stream's audio that stops this long (ms: a jump in event time, or on the "
        "wall clock once the worker has read everything) ends its utterance: its final.")
    asr_lang: str = _opt("en", "The lang field of published segments (empty: none).")
    asr_streams: str = _opt(
        "", "Stream ids `streamproc asr` transcribes, comma separated; empty: every stream "
        "with audio. List only the streams without transcripts of their own when some "
        "producers send them (both would land on the stream's text).")
    log_level: str = _opt("info", "Log level: debug, info, warning, error. Below debug the "
                          "Kafka clients' own connection chatter is not shown; connection "
                          "failures are reported as one line with their cause.",
                          choices=LOG_LEVELS)
    # --- web view (streamproc view) ------------------------------------------------------
    view_host: str = _opt(
        "127.0.0.1", "Address the web view binds to. Any address but a loopback one (0.0.0.0: "
        "every interface) shows the streams to whoever can reach it; the view then warns.")
    view_port: int = _opt(
        8088, "Port of the web view (`streamproc view`, and the one `streamproc demo` "
        "serves); 0: the demo serves no view.")
    view_token: str = _opt(
        "", "When set, the web view asks for this token: open /?token=TOKEN once (a cookie "
        "keeps it) or send Authorization: Bearer TOKEN.", secret=True)
    view_metrics_url: str = _opt(
        "", "Worker /metrics endpoints the web view reads health from (lag, windows/s, batch "
        "sizes, latencies), comma separated; empty: no health panel (the demo gives its "
        "worker's).")
    view_fps: float = _opt(
        2.0, "Most frames per second per stream the web view decodes, downscales and sends.")
    view_history_s: int = _opt(
        120, "How much of each stream the web view's timeline shows (seconds of event time).")

    def __post_init__(self) -> None:
        checks = {
            "partitions": (self.partitions >= 1, "must be at least 1"),
            "replication_factor": (self.replication_factor >= 1, "must be at least 1"),
            "max_message_bytes": (self.max_message_bytes >= 1024, "must be at least 1024"),
            "window_ms": (self.window_ms > 0, "must be positive"),
            "hop_ms": (0 < self.hop_ms <= self.window_ms,
                       f"must be positive and at most window_ms={self.window_ms}"),
            "lateness_video_ms": (self.lateness_video_ms >= 0, "must not be negative"),
            "lateness_audio_ms": (self.lateness_audio_ms >= 0, "must not be negative"),
            "lateness_text_ms": (self.lateness_text_ms >= 0, "must not be negative"),
            "idle_deadline_video_ms": (self.idle_deadline_video_ms >= 0, "must not be negative"),
            "idle_deadline_audio_ms": (self.idle_deadline_audio_ms >= 0, "must not be negative"),
            "idle_deadline_text_ms": (self.idle_deadline_text_ms >= 0, "must not be negative"),
            "frames_per_window": (self.frames_per_window >= 1, "must be at least 1"),
            "sample_rate": (self.sample_rate >= 1000, "must be at least 1000 Hz"),
            "max_buffer_frames": (self.max_buffer_frames >= 1, "must be at least 1"),
            "max_buffer_audio_s": (self.max_buffer_audio_s > 0, "must be positive"),
            "max_future_ms": (self.max_future_ms >= 0, "must not be negative"),
            "max_lead_ms": (self.max_lead_ms >= 0, "must not be negative"),
            "max_span_audio_ms": (self.max_span_audio_ms >= 0, "must not be negative"),
            "max_span_text_ms": (self.max_span_text_ms >= 0, "must not be negative"),
            "max_frame_pixels": (self.max_frame_pixels >= 1, "must be at least 1"),
            "stream_expiry_ms": (self.stream_expiry_ms >= 0, "must not be negative"),
            "revision_horizon_ms": (self.revision_horizon_ms >= 0, "must not be negative"),
            "final_within_ms": (self.final_within_ms >= -1, "must be -1 (auto), 0 or more"),
            "batch_size": (self.batch_size >= 1, "must be at least 1"),
            "model_threads": (self.model_threads >= 0, "must not be negative"),
            # group.min.session.timeout.ms: a broker refuses a shorter session at join
            "session_timeout_ms": (self.session_timeout_ms >= 6000, "must be at least 6000"),
            "switch_interval_us": (50 <= self.switch_interval_us <= 100_000,
                                   "must be 50 to 100000"),
            "batch_max_wait_ms": (self.batch_max_wait_ms >= 0, "must not be negative"),
            "model_reload_s": (self.model_reload_s >= 0, "must not be negative"),
            "device": (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                       "must be auto, cpu, cuda or cuda:N"),
            "security_protocol": (
                self.security_protocol in SECURITY_PROTOCOLS,
                "must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
            "sasl_mechanism": (self.sasl_mechanism in ("", *SASL_MECHANISMS),
                               "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
            "asr_engine": (":" in self.asr_engine, "must be package.module:factory"),
            "asr_processes": (self.asr_processes == "auto" or (
                self.asr_processes.isdigit() and int(self.asr_processes) <= 256),
                "must be auto or a number of processes, 0 to 256"),
            "asr_vad": (self.asr_vad in ASR_VADS, "must be webrtc or energy"),
            "model_in": (self.model_in in MODEL_IN, "must be thread or process"),
            "asr_vad_mode": (0 <= self.asr_vad_mode <= 3, "must be 0, 1, 2 or 3"),
            "asr_partial_interval_ms": (self.asr_partial_interval_ms >= 0,
                                        "must not be negative"),
            "asr_end_silence_ms": (self.asr_end_silence_ms >= 30, "must be at least 30"),
            "asr_max_utterance_ms": (1000 <= self.asr_max_utterance_ms <= 30_000,
                                     "must be 1000 to 30000 (a segment's longest span)"),
            "asr_gap_ms": (self.asr_gap_ms >= 30, "must be at least 30"),
            "log_level": (self.log_level in LOG_LEVELS, "must be debug, info, warning or error"),
            "view_host": (bool(self.view_host.strip()), "must not be empty"),
            "view_port": (0 <= self.view_port <= 65535, "must be a port, 0 to 65535"),
            "view_fps": (0 < self.view_fps <= 30, "must be above 0 and at most 30"),
            "view_history_s": (10 <= self.view_history_s <= 86400,
                               "must be 10 to 86400 seconds"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"invalid setting {name}={getattr(self, name)!r}: {rule} "
                                  f"({_HELP[name]})")
        # every client (kafka-python, aiokafka, faust) must get the same, complete login
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not self.sasl_mechanism:
            raise ConfigError(f"security_protocol={self.security_protocol} needs "
                              "sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        if self.sasl_mechanism and not sasl:
            raise ConfigError(f"sasl_mechanism={self.sasl_mechanism} needs security_protocol "
                              f"SASL_PLAINTEXT or SASL_SSL, not {self.security_protocol}")
        if sasl and not (self.sasl_username and self.sasl_password):
            raise ConfigError(f"security_protocol={self.security_protocol} needs "
                              "sasl_username and sasl_password")
        fast = self._provisional_names()
        if fast - set(MODALITIES) and fast != {"none"}:
            raise ConfigError(
                f"invalid setting provisional_on={self.provisional_on!r}: use a comma "
                f"separated subset of {', '.join(MODALITIES)}, or none")
        bad = set(self.modalities) - set(MODALITIES)
        if bad or not self.modalities:
            raise ConfigError(
                f"invalid setting expected_modalities={self.expected_modalities!r}: "
                f"use a comma separated subset of {', '.join(MODALITIES)}"
            )
        fast_expected = self._fast_expected()
        if self.final_within_ms > 0 and not (fast_expected and fast_expected != set(self.modalities)):
            raise ConfigError(
                f"invalid setting final_within_ms={self.final_within_ms}: it bounds how long "
                "a final waits after its provisional for the modalities not in "
                "provisional_on, and provisional_on="
                f"{self.provisional_on!r} with expected_modalities={self.expected_modalities!r} "
                "leaves none (or no provisional modality); set provisional_on, or 0")

    # --- derived values --------------------------------------------------------------
    @property
    def modalities(self) -> tuple[Modality, ...]:
        """``expected_modalities`` as a tuple (each one checked when the settings are built)."""
        names = tuple(m.strip() for m in self.expected_modalities.split(",") if m.strip())
        return cast(tuple[Modality, ...], names)

    @property
    def provisional_modalities(self) -> tuple[Modality, ...]:
        """``provisional_on`` as a tuple, in the order of MODALITIES."""
        fast = self._provisional_names()
        return tuple(m for m in MODALITIES if m in fast)

    def _fast_expected(self) -> set[Modality]:
        """The expected modalities a provisional prediction waits for."""
        return set(self.provisional_modalities) & set(self.modalities)

    def _provisional_names(self) -> set[str]:
        return {m.strip().lower() for m in self.provisional_on.split(",") if m.strip()}

    def topic(self, kind: str) -> str:
        """Topic name for ``video``, ``audio``, ``text``, ``predictions`` or ``deadletter``."""
        return f"{self.topic_prefix}.{kind}"

    @property
    def input_topics(self) -> tuple[str, str, str]:
        return (self.topic("video"), self.topic("audio"), self.topic("text"))

    @property
    def all_topics(self) -> tuple[str, ...]:
        return (*self.input_topics, self.topic("predictions"), self.topic("deadletter"))

    def lateness_ns(self, modality: str) -> int:
        return int(getattr(self, f"lateness_{modality}_ms")) * 1_000_000

    def idle_deadline_ns(self, modality: str) -> int:
        return int(getattr(self, f"idle_deadline_{modality}_ms")) * 1_000_000

    def final_within_ns(self) -> int:
        """The bound on a final's wait after its provisional, with -1 (auto) resolved."""
        if self.final_within_ms >= 0:
            return self.final_within_ms * 1_000_000
        fast = self._fast_expected()
        slow = set(self.modalities) - fast
        # only transcripts revise a final: anything else after the bound would be lost
        if not fast or slow != {"text"} or not self.revision_horizon_ms:
            return 0
        lateness = self.lateness_ns("text") - max(map(self.lateness_ns, fast))
        return max(lateness - FINAL_WITHIN_MARGIN_MS * 1_000_000, 0)

    def security_kwargs(self) -> dict[str, Any]:
        """Security options in the spelling kafka-python and aiokafka share."""
        kw: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            try:
                ctx = ssl.create_default_context(cafile=self.ssl_cafile or None)
                if self.ssl_certfile:
                    ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"cannot load the SSL files (ssl_cafile={self.ssl_cafile!r}, "
                                  f"ssl_certfile={self.ssl_certfile!r}): {e}") from None
            kw["ssl_context"] = ctx
        return kw

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def load(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then environment, then CLI flags that were given."""
        values, _ = cls._resolve(args, os.environ if environ is None else environ)
        return cls(**values)

    @classmethod
    def describe(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> list[tuple[str, str, str]]:
        """(name, shown value, source) rows for ``streamproc config``; secrets masked."""
        values, sources = cls._resolve(args, os.environ if environ is None else environ)
        cls(**values)  # validate
        rows = []
        for f in dataclasses.fields(cls):
            v = values[f.name]
            shown = "***" if (f.metadata["secret"] and v) else str(v)
            rows.append((f.name, shown, sources[f.name]))
        return rows

    @classmethod
    def _resolve(
        cls, args: argparse.Namespace | None, environ: Mapping[str, str]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            values[f.name], sources[f.name] = f.default, "default"
            env = env_name(f)
            if env in environ and environ[env] != "":
                values[f.name], sources[f.name] = _convert(f, environ[env], env), f"env {env}"
            cli = getattr(args, f.name, None) if args is not None else None
            if cli is not None:
                values[f.name], sources[f.name] = _convert(f, cli, flag_name(f)), "flag"
        return values, sources


_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(Settings)}


def env_name(f: dataclasses.Field) -> str:
    return f.metadata["env"] or f"STREAMPROC_{f.name.upper()}"


#: STREAMPROC_* variables read that are not settings: where caches live, and where the
#: browser tests put their screenshots.
OTHER_ENV = frozenset({"STREAMPROC_CACHE", "STREAMPROC_SCREENSHOT_DIR"})


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """One line per STREAMPROC_* variable that nothing reads (a misspelt setting would
    otherwise be ignored without a word), with the closest known name."""
    import difflib

    known = {env_name(f) for f in dataclasses.fields(Settings)} | OTHER_ENV
    out = []
    for name in sorted(environ):
        if name.startswith("STREAMPROC_") and name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            out.append(f"{name} is not a setting and is ignored{hint}")
    return out


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _spelled(choices: tuple[str, ...], raw: str) -> str:
    """``raw`` as one of ``choices`` spells it, matched case-insensitively (``INFO`` is
    ``info``, ``sasl_ssl`` is ``SASL_SSL``); anything else unchanged, for the check to name."""
    return next((c for c in choices if c.lower() == raw.strip().lower()), raw)


def _convert(f: dataclasses.Field[Any], raw: Any, where: str) -> Any:
    kind: type[Any] = type(f.default)
    if f.metadata["choices"] and isinstance(raw, str):
        raw = _spelled(f.metadata["choices"], raw)
    if isinstance(raw, kind):
        return raw
    try:
        return kind(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected {kind.__name__} for {f.name}, got {raw!r}") from None


def settings_table() -> str:
    """Every setting as a Markdown table (the README's; `streamproc config --markdown`)."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f"`{f.default}`" if f.default != "" else "(empty)"
        rows.append(f"| `{f.name}` | `{flag_name(f)}` | `{env_name(f)}` | {default} | "
                    f"{f.metadata['help']} |")
    return "\n".join(rows)


# Settings by what uses them. A command names what it reads (COMMAND_GROUPS) as these
# groups and, where it reads only part of a group, single settings; so its --help offers
# no flag that does nothing for it. Group names are never setting names.
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    # every Kafka client: where the brokers are, how it logs in, and its client id
    # (streamproc-ROLE-APPID), so whatever opens a client reads app_id
    "kafka": ("bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username",
              "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "app_id"),
    # the command's own log, and the Kafka clients' loggers (main() sets those): it acts
    # where a command logs or opens a client
    "logging": ("log_level",),
    "topics": ("topic_prefix", "max_message_bytes"),
    "topic_layout": ("partitions", "replication_factor"),
    # the windows an Aligner cuts (AlignConfig.from_settings), and a model's window shape
    "windows": ("window_ms", "hop_ms", "lateness_video_ms", "lateness_audio_ms",
                "lateness_text_ms", "idle_deadline_video_ms", "idle_deadline_audio_ms",
                "idle_deadline_text_ms", "expected_modalities", "revision_horizon_ms",
                "frames_per_window", "sample_rate", "max_buffer_frames", "max_buffer_audio_s",
                "max_future_ms", "max_lead_ms", "max_span_audio_ms", "max_span_text_ms",
                "stream_expiry_ms"),
    "inference": ("batch_size", "batch_max_wait_ms", "device", "model_threads", "model_in",
                  "model_reload_s"),
    "worker": ("data_dir", "metrics_port", "web_port", "session_timeout_ms",
               "switch_interval_us"),
    "asr": ("asr_processes", "asr_vad", "asr_vad_mode", "asr_partial_interval_ms",
            "asr_end_silence_ms", "asr_gap_ms", "asr_lang", "asr_streams"),
    "view": ("view_host", "view_port", "view_token", "view_metrics_url", "view_fps",
             "view_history_s"),
}

# What each command reads, as SETTING_GROUPS names or setting names; its --help offers
# these as flags (None: every setting). Traced from the code each command runs;
# tests/unit/test_cli_settings.py holds the table to that code.
COMMAND_GROUPS: dict[str, tuple[str, ...] | None] = {
    "config": None,  # prints them all
    "broker": (),
    "topics": ("kafka", "logging", "topics", "topic_layout"),
    "produce": ("kafka", "logging", "topics"),
    "consume": ("kafka", "logging", "topics"),
    "view": ("kafka", "logging", "topics", "view", "max_frame_pixels"),
    # the worker makes only its progress topic, as many partitions as the inputs have
    "worker": ("kafka", "logging", "topics", "replication_factor", "windows",
               "provisional_on", "final_within_ms", "max_frame_pixels", "model", "inference",
               "worker"),
    "asr": ("kafka", "logging", "topics", "asr", "asr_engine", "asr_max_utterance_ms",
            "session_timeout_ms", "stream_expiry_ms"),
    # a dataset holds final windows only: record never reads provisional_on
    "record": ("kafka", "logging", "topics", "windows"),
    "avdigits dataset": ("window_ms", "hop_ms", "frames_per_window", "sample_rate"),
    "avdigits clip": ("sample_rate",),
    "train": ("device",),
    "eval": ("device",),
    # topics, producers and a reader in its own process; a worker, a view and (--asr) a
    # recogniser as children, which get these settings from it. It picks their model,
    # data_dir, web_port, asr_engine and asr_max_utterance_ms itself.
    "demo": ("kafka", "logging", "topics", "topic_layout", "windows", "provisional_on",
             "final_within_ms", "max_frame_pixels", "inference", "metrics_port",
             "session_timeout_ms", "switch_interval_us", "asr", "view"),
}


def settings_named(groups: tuple[str, ...] | None) -> tuple[str, ...]:
    """The settings that ``groups`` (:data:`SETTING_GROUPS` names or setting names; None:
    every setting) stand for, in the order of :class:`Settings`."""
    every = tuple(f.name for f in dataclasses.fields(Settings))
    if groups is None:
        return every
    wanted: set[str] = set()
    for name in groups:
        if name in SETTING_GROUPS:
            wanted.update(SETTING_GROUPS[name])
        elif name in every:
            wanted.add(name)
        else:
            raise ValueError(f"{name!r} is neither a settings group nor a setting")
    return tuple(n for n in every if n in wanted)


def commands_reading(flag: str) -> list[str]:
    """The commands (but ``config``, which prints every setting) whose flags include
    ``flag`` (``--window-ms`` or ``--window-ms=500``); [] when it names no setting."""
    name = flag.split("=", 1)[0].removeprefix("--").replace("-", "_")
    if name not in {f.name for f in dataclasses.fields(Settings)}:
        return []
    return [c for c, groups in COMMAND_GROUPS.items()
            if groups is not None and name in settings_named(groups)]


def add_settings_args(parser: argparse.ArgumentParser,
                      groups: tuple[str, ...] | None = None) -> None:
    """Add a ``--flag`` for each setting of ``groups`` (see :func:`settings_named`); unset
    flags stay None, so the environment and the defaults apply, to the others as well."""
    names = settings_named(groups)
    if not names:
        return
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    group = parser.add_argument_group(
        "settings this command reads (each also from its STREAMPROC_* variable)")
    for name in names:
        f = fields[name]
        choices = f.metadata["choices"]
        by_kind: dict[str, Any] = (
            {"choices": choices, "type": functools.partial(_spelled, choices)} if choices
            else {"metavar": type(f.default).__name__.upper()})
        group.add_argument(
            flag_name(f),
            dest=f.name,
            default=None,
            help=f"{f.metadata['help']} [env {env_name(f)}; default {f.default!r}]",
            **by_kind,
        )


def commands_table() -> str:
    """Which settings each command reads, as Markdown (the README's): a command's groups
    and single settings, then the settings of each group."""
    def shown(name: str) -> str:
        return f"*{name}*" if name in SETTING_GROUPS else f"`{name}`"

    rows = ["| command | settings it reads: the flags its `--help` lists |", "|---|---|"]
    for command, groups in COMMAND_GROUPS.items():
        what = ("every setting (it prints them)" if groups is None
                else ", ".join(shown(g) for g in groups) or "none")
        rows.append(f"| `streamproc {command}` | {what} |")
    rows += ["", "| group | settings |", "|---|---|"]
    rows += [f"| *{g}* | {', '.join(f'`{n}`' for n in names)} |"
             for g, names in SETTING_GROUPS.items()]
    return "\n".join(rows)


def settings_argv(settings: Settings, names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Flags and environment variables that give a child ``streamproc`` command the values
    ``names`` have in ``settings``: a flag for each value other than the default (the rest
    are defaults there too, in an environment without STREAMPROC_* variables); secrets as
    variables, never on a command line, where ``ps`` shows them."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    flags: list[str] = []
    env: dict[str, str] = {}
    for name in names:
        f, value = fields[name], getattr(settings, name)
        if value == f.default:
            continue
        if f.metadata["secret"]:
            env[env_name(f)] = str(value)
        else:
            # --flag=VALUE: a value may start with a dash
            flags.append(f"{flag_name(f)}={value}")
    return flags, env


def settings_environ_names() -> frozenset[str]:
    """The environment variable of every setting."""
    return frozenset(env_name(f) for f in dataclasses.fields(Settings))


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (a port in TIME_WAIT counts as free,
    as servers bind with SO_REUSEADDR)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_worker_ports(settings: Settings, who: str = "the worker") -> None:
    """UserError when a port the worker serves on (every interface) is taken."""
    for name, port, off in (("metrics", settings.metrics_port, "no endpoint"),
                            ("web", settings.web_port, "no faust web server")):
        if port and not port_free("0.0.0.0", port):
            raise UserError(f"cannot serve {name} on port {port}: it is in use (another "
                            f"worker on this machine? give {who} another "
                            f"--{name}-port, or 0 for {off})")
