"""Hot reload: a worker serves a new checkpoint written to its ``--model`` directory, with
no restart and no window lost or scored twice.

A :class:`ModelReloader` thread looks at the checkpoint's two files every
``model_reload_s`` seconds (or at once on SIGHUP). When they change and then stay unchanged
for ``SETTLE_S`` (``streamproc train`` writes the weights, then ``model.json``), it loads the
new checkpoint in that thread, checks it fits the running worker (digest, protocol, the
window settings its aligners cut), warms it up, and swaps it into the
:class:`~streamproc.inference.predictor.Predictor`: the next batch uses it. Nothing of
this runs on the worker's event loop. A checkpoint that fails any check is refused with
its reason in the log and the ``model_reloads_total{result="refused"}`` counter; the model
being served goes on, and the same files are not tried again until they change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from streamproc.inference.predictor import Predictor, Served

log = logging.getLogger("streamproc.worker")

#: How long the checkpoint's files must stay unchanged before they are loaded (s).
SETTLE_S = 1.0

Signature = tuple[tuple[int, int, int], ...] | None


def _files() -> tuple[str, str]:
    """A checkpoint's two files. Imported here, not with this module: the model stack
    (torch) is loaded only by a worker that serves a model, at start-up; an align-only
    worker would pay about 500 MB and seconds of start-up for nothing."""
    from streamproc.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    return CONFIG_FILE, WEIGHTS_FILE


def checkpoint_dir(spec: str) -> Path | None:
    """The checkpoint directory of a ``--model`` spec; None for an import path."""
    path = Path(spec).expanduser()
    if path.is_file() and path.name in _files():
        return path.parent
    return path if path.is_dir() else None


def signature(directory: Path) -> Signature:
    """What changes when a checkpoint in ``directory`` is written (None: not all there)."""
    try:
        stats = [(directory / name).stat() for name in _files()]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class ModelReloader:
    """Watches ``directory`` and swaps new checkpoints into ``predictor`` (own thread).

    ``check(served)`` raises (any exception; its message is the reason logged) for a model
    the worker cannot serve, and may warm it up. ``on_result(result, served)`` is called
    with ``"ok"`` / ``"refused"`` / ``"unchanged"`` after each attempt (from this thread).
    ``loaded``: the signature of the files the served model came from.
    """

    def __init__(self, predictor: Predictor, directory: Path, *, poll_s: float,
                 check: Callable[[Served], None],
                 on_result: Callable[[str, Served], None] = lambda r, s: None,
                 loaded: Signature = None, settle_s: float = SETTLE_S) -> None:
        self.predictor = predictor
        self.directory = directory
        self.poll_s = poll_s
        self.check = check
        self.on_result = on_result
        self.settle_s = settle_s
        self._seen = loaded
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-reload", daemon=True)
        self._thread.start()

    def trigger(self) -> None:
        """Look at the checkpoint now (a signal handler may call this)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._wake.wait(self.poll_s if self.poll_s > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll(forced=asked)
            except Exception:  # never let the watcher die: the next change is tried again
                log.exception("model reload: unexpected error (the served model goes on)")

    def poll(self, forced: bool = False) -> str | None:
        """Load and swap in the checkpoint if its files changed (or ``forced``); the
        result, or None when there was nothing to do."""
        sig = signature(self.directory)
        if sig == self._seen and not forced:
            return None
        if sig is None:
            if forced:
                log.error("model reload refused: %s has no complete checkpoint (it needs %s "
                          "and %s); still serving %s", self.directory, *_files(),
                          self.predictor.served.describe())
            self._seen = sig
            return None
        while True:  # a checkpoint being written: wait until its files stay as they are
            if self._stop.wait(self.settle_s):
                return None
            now = signature(self.directory)
            if now == sig:
                break
            sig = now
        self._seen = sig
        return self.reload()

    def reload(self) -> str:
        current = self.predictor.served
        t0 = time.perf_counter()
        try:
            new = self.predictor.load(str(self.directory))
            if new.info == current.info and "checkpoint" in new.info:
                log.info("model reload: %s has the checkpoint already served (%s); nothing "
                         "to do", self.directory, current.describe())
                self.on_result("unchanged", current)
                return "unchanged"
            self.check(new)
            self.predictor.swap(new)  # a model process may fail to load it too
        except Exception as e:
            reason = (str(e) or type(e).__name__).rstrip(".")
            log.error("model reload refused: %s: %s; still serving %s", self.directory,
                      reason, current.describe())
            self.on_result("refused", current)
            return "refused"
        if new.info["name"] == current.info["name"] and \
                new.info["version"] == current.info["version"]:
            log.warning("model reload: the new checkpoint has the same name and version as "
                        "the one it replaces (%s/%s); only the checkpoint digest in "
                        "predictions tells them apart (streamproc train --version)",
                        new.info["name"], new.info["version"])
        log.info("model reloaded: serving %s from %s (was %s); loaded and warmed up in "
                 "%.1f s", new.describe(), self.directory, current.describe(),
                 time.perf_counter() - t0)
        self.on_result("ok", new)
        return "ok"
