"""One settings object for every streamproc command.

Precedence, lowest to highest: built-in default < environment (``STREAMPROC_*``) < CLI flag.
Every field documents itself (help text, env var, flag), so ``streamproc config`` and
the README table are generated from the same place and cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamproc.errors import UserError

MODALITIES: tuple[str, ...] = ("video", "audio", "text")


class ConfigError(UserError, ValueError):
    """A setting has a value that cannot work; the message names the setting."""


def _opt(default: Any, help: str, env: str | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "env": env, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # --- Kafka connection -------------------------------------------------------------
    bootstrap_servers: str = _opt(
        "localhost:9092", "Kafka bootstrap servers, comma separated.", env="STREAMPROC_BOOTSTRAP"
    )
    security_protocol: str = _opt(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (passed to every client)."
    )
    sasl_mechanism: str = _opt("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used.")
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
    # --- windows (design.md section 3) -------------------------------------------------
    window_ms: int = _opt(1000, "Window length W in milliseconds of event time.")
    hop_ms: int = _opt(500, "Window hop H in milliseconds (H = W gives tumbling windows).")
    lateness_video_ms: int = _opt(250, "Allowed lateness of video frames (ms).")
    lateness_audio_ms: int = _opt(250, "Allowed lateness of audio chunks (ms).")
    lateness_text_ms: int = _opt(3000, "Allowed lateness of transcript segments (ms); ASR lags.")
    idle_deadline_ms: int = _opt(
        3000,
        "Wall-clock deadline (ms) after which a window closes even if a modality is silent.",
    )
    expected_modalities: str = _opt(
        "video,audio,text", "Modalities a window waits for, comma separated."
    )
    frames_per_window: int = _opt(8, "K: frames sampled evenly from each window for the model.")
    sample_rate: int = _opt(16000, "Audio rate (Hz) windows are resampled to for the model.")
    max_buffer_frames: int = _opt(600, "Cap on buffered video frames per stream.")
    max_buffer_audio_s: float = _opt(60.0, "Cap on buffered audio seconds per stream.")
    max_future_ms: int = _opt(
        60_000, "Records whose event time is further ahead of the worker's clock are "
        "dead-lettered (a producer clock is wrong); 0: no limit.")
    # --- model and inference -----------------------------------------------------------
    model: str = _opt(
        "",
        "Checkpoint directory/file, or `package.module:factory` for a user model. "
        "Empty: the reference model that `streamproc demo` trains.",
    )
    batch_size: int = _opt(32, "Largest micro-batch of windows sent to the model at once.")
    batch_max_wait_ms: int = _opt(20, "Longest a window waits for its micro-batch to fill (ms).")
    device: str = _opt("auto", "auto (CUDA when available), cpu or cuda.")
    # --- worker ----------------------------------------------------------------------
    app_id: str = _opt("streamproc", "Consumer group / faust app id shared by all workers.")
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
    log_level: str = _opt("info", "Log level: debug, info, warning, error.")

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
            "idle_deadline_ms": (self.idle_deadline_ms > 0, "must be positive"),
            "frames_per_window": (self.frames_per_window >= 1, "must be at least 1"),
            "sample_rate": (self.sample_rate >= 1000, "must be at least 1000 Hz"),
            "max_buffer_frames": (self.max_buffer_frames >= 1, "must be at least 1"),
            "max_buffer_audio_s": (self.max_buffer_audio_s > 0, "must be positive"),
            "max_future_ms": (self.max_future_ms >= 0, "must not be negative"),
            "batch_size": (self.batch_size >= 1, "must be at least 1"),
            "session_timeout_ms": (self.session_timeout_ms >= 1000, "must be at least 1000"),
            "batch_max_wait_ms": (self.batch_max_wait_ms >= 0, "must not be negative"),
            "device": (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                       "must be auto, cpu, cuda or cuda:N"),
            "security_protocol": (
                self.security_protocol in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
                "must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"invalid setting {name}={getattr(self, name)!r}: {rule} "
                                  f"({_HELP[name]})")
        bad = set(self.modalities) - set(MODALITIES)
        if bad or not self.modalities:
            raise ConfigError(
                f"invalid setting expected_modalities={self.expected_modalities!r}: "
                f"use a comma separated subset of {', '.join(MODALITIES)}"
            )

    # --- derived values --------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.expected_modalities.split(",") if m.strip())

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

    def security_kwargs(self) -> dict[str, Any]:
        """Security options in the spelling kafka-python and aiokafka share."""
        kw: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            ctx = ssl.create_default_context(cafile=self.ssl_cafile or None)
            if self.ssl_certfile:
                ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
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


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _convert(f: dataclasses.Field, raw: Any, where: str) -> Any:
    kind = type(f.default)
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


def add_settings_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per setting; unset flags stay None so env and defaults apply.

    ``skip``: settings whose flag the command uses for something else (``produce camera
    --device`` is a camera); they still come from the environment.
    """
    group = parser.add_argument_group("settings (also from STREAMPROC_* environment variables)")
    for f in dataclasses.fields(Settings):
        if f.name in skip:
            continue
        group.add_argument(
            flag_name(f),
            dest=f.name,
            default=None,
            metavar=type(f.default).__name__.upper(),
            help=f"{f.metadata['help']} [env {env_name(f)}; default {f.default!r}]",
        )
