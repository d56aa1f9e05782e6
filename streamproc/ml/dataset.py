"""Dataset directories: labelled windows in shards plus a manifest, and labels files.

Layout of a dataset directory::

    manifest.json        format, version, labels, window shape, splits, shard list + digests
    shard-00000.npz      bulky arrays (encoded frames, int16 audio, packed audio masks);
                         read with allow_pickle=False
    shard-00000.json     per-window metadata: stream, times, segments, presence, quality,
                         provenance, label, split, info

``streamproc record`` (windows from Kafka) and the AV-Digits generator both write this
format through :class:`DatasetWriter`, so training has one input path. Nothing here
pickles; a shard whose bytes do not match the manifest digest is refused.

``streamproc record --append`` adds windows to an existing dataset: the window settings
must match, a window already in it (same stream and start) is skipped rather than stored
twice, and every file is replaced atomically with the manifest written last, so a crash
leaves the dataset as it was after its last complete shard. One writer at a time (a lock
file).

A *labels file* says which label each stretch of a stream has (CSV). A time is either a
number, seconds from the stream's origin (``record --origin``), or an ISO-8601 date and
time with its zone, an absolute event time::

    stream_id,start,end,label
    cam1,0.000,2.000,seven
    door,2026-11-30T09:15:00Z,2026-11-30T09:16:30Z,speaking
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from streamproc.align.aligner import Window
from streamproc.errors import UserError
from streamproc.wire.codec import (
    NS_PER_S,
    Source,
    TranscriptSegment,
    VideoFrame,
    Word,
    pcm_bytes,
)

FORMAT = "streamproc-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


class DatasetError(UserError):
    """A dataset directory that cannot be read or written; the message says why."""


class WindowRef(NamedTuple):
    """A stored window without its media: enough to split and to find duplicates."""

    stream_id: str
    start_ns: int
    end_ns: int
    label: str
    split: str


class Example(NamedTuple):
    window: Window
    label: str
    split: str
    info: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` whole: a reader (or a crash) sees the old file or the
    new one, never part of it. Synced before the rename, so the new name never points at
    bytes still in flight."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable (best effort: not every filesystem can)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


LOCK_FILE = ".lock"
#: Window settings an appended recording must share with the dataset.
WINDOW_KEYS = ("window_ms", "hop_ms", "frames_per_window", "sample_rate")


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def _window_meta(w: Window, label: str, split: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "stream_id": w.stream_id, "start_ns": w.start_ns, "end_ns": w.end_ns,
        "frame_count": w.frame_count, "sample_rate": w.sample_rate,
        "segments": [{**s.to_json(), "seq": s.seq} for s in w.segments],
        "present": dict(w.present), "quality": dict(w.quality),
        "provenance": {m: [[s.topic, s.partition, s.offset] for s in srcs]
                       for m, srcs in w.provenance.items()},
        "label": label, "split": split, "info": info,
    }


def _audio_int16(a: np.ndarray) -> np.ndarray:
    """Float samples as 16-bit PCM, the wire's own conversion (read back / 32768)."""
    return np.frombuffer(pcm_bytes(np.asarray(a, np.float32).reshape(-1, 1), "s16le"), "<i2")


class DatasetWriter:
    """Add labelled windows; ``close()`` writes the last shard and the manifest.

    ``window`` records how the windows were cut (``hop_ms``, ``frames_per_window``, and
    optionally ``window_ms``, ``sample_rate``) in the manifest next to the window length
    and sample rate read from the windows.

    Audio is stored as 16-bit PCM (the wire's usual format; float input is clipped to
    [-1, 1]). ``labels`` fixes the class order; without it, labels are kept in order of
    first appearance. Use as a context manager: what was added is kept even when the
    producer of windows stops with an error or Ctrl-C.

    ``append``: add to the dataset already in ``path`` (a new one if there is none). Its
    window settings must equal ``window``'s; labels not in it yet are refused unless
    ``add_labels`` (they then follow its labels in the class order). A window whose
    ``(stream_id, start_ns)`` the dataset already holds is skipped (:meth:`add` returns
    False): recording the same span twice stores it once, with its first label.

    The manifest is rewritten (atomically) after every shard, so a crash keeps every
    complete shard and never leaves the manifest naming a file that is not whole.
    """

    def __init__(self, path: str | Path, *, labels: Sequence[str] | None = None,
                 source: dict[str, Any] | None = None, window: dict[str, Any] | None = None,
                 shard_size: int = 512, overwrite: bool = False, append: bool = False,
                 add_labels: bool = False) -> None:
        if overwrite and append:
            raise DatasetError("overwrite and append exclude each other")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()
        try:
            self._open(labels, source, window, overwrite, append, add_labels)
        except BaseException:
            self._lock.close()
            raise
        self.shard_size = shard_size
        self._pending: list[tuple[Window, dict[str, Any]]] = []
        self._closed = False

    def _take_lock(self) -> Any:
        f = open(self.path / LOCK_FILE, "a+b")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DatasetError(f"{self.path} is being written by another process (it holds "
                               f"{self.path / LOCK_FILE}); wait for it to finish") from None
        return f

    def _open(self, labels: Sequence[str] | None, source: dict[str, Any] | None,
              window: dict[str, Any] | None, overwrite: bool, append: bool,
              add_labels: bool) -> None:
        exists = (self.path / MANIFEST).exists()
        if exists and not (overwrite or append):
            raise DatasetError(f"{self.path} already holds a dataset; append to it (record "
                               "--append), choose another directory, or pass overwrite")
        self.fixed_labels = labels is not None
        self.labels: list[str] = list(labels or [])
        self.source = dict(source or {})
        self.recording_source = dict(source or {})
        self.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.recordings: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []
        self.split_counts: dict[str, int] = {}
        self.label_counts: dict[str, int] = {}
        self.window_shape: dict[str, Any] | None = None
        self.window_info = dict(window or {})  # e.g. hop_ms, frames_per_window
        self.keys: set[tuple[str, int]] = set()  # (stream_id, start_ns) of every window
        self.added = 0
        self.skipped = 0  # already in the dataset
        if not (append and exists):
            # the manifest goes first: until a new one is written there is no dataset
            # here, rather than a manifest naming shards that are gone
            (self.path / MANIFEST).unlink(missing_ok=True)
            for old in {*self.path.glob("shard-*"), *self.path.glob("*.tmp")}:
                old.unlink()
            return
        ds = Dataset(self.path)
        m = ds.manifest
        have = ds.window
        wanted = {k: self.window_info[k] for k in WINDOW_KEYS if k in self.window_info}
        differ = {k: (have[k], v) for k, v in wanted.items() if k in have and have[k] != v}
        if differ:
            raise DatasetError(
                f"{self.path} holds windows cut with "
                + ", ".join(f"{k}={a}" for k, (a, _) in differ.items()) + "; these settings "
                "cut them with " + ", ".join(f"{k}={b}" for k, (_, b) in differ.items())
                + ": append with the dataset's window settings, or record into a new one")
        new = [lab for lab in self.labels if lab not in ds.labels]
        if new and not add_labels:
            raise DatasetError(
                f"labels {new} are not among the dataset's {ds.labels}; pass --add-labels to "
                "add them as new classes (after the others), or fix the labels file")
        self.labels = [*ds.labels, *new]
        self.fixed_labels = True
        self.source = dict(m.get("source") or self.source)
        self.recordings = list(m.get("recordings") or ([m["source"]] if m.get("source")
                                                        else []))
        self.shards = list(m["shards"])
        self.split_counts = dict(m.get("splits", {}))
        self.label_counts = dict(m.get("label_counts", {}))
        if "window_ms" in have and "sample_rate" in have:
            self.window_shape = {"window_ms": have["window_ms"],
                                 "sample_rate": have["sample_rate"]}
        self.window_info = {**{k: v for k, v in have.items() if k not in
                               ("window_ms", "sample_rate")}, **self.window_info}
        self.keys = {(e.stream_id, e.start_ns) for e in ds.index()}
        # a recording that crashed leaves shards the manifest never named: not data
        named = {f"{sh['name']}.{ext}" for sh in self.shards for ext in ("npz", "json")}
        for f in {*self.path.glob("shard-*"), *self.path.glob("*.tmp")}:
            if f.name not in named:
                f.unlink()
        self.created_at = m.get("created_at", self.created_at)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards) + len(self._pending)

    def add(self, window: Window, label: str, split: str = "train",
            info: dict[str, Any] | None = None) -> bool:
        """Add one window; False when the dataset already holds it (nothing is added)."""
        if self._closed:
            raise DatasetError("dataset writer is closed")
        if label not in self.labels:
            if self.fixed_labels:
                raise DatasetError(f"label {label!r} is not one of {self.labels}")
            self.labels.append(label)
        shape = {"window_ms": (window.end_ns - window.start_ns) // 1_000_000,
                 "sample_rate": window.sample_rate}
        if self.window_shape is None:
            self.window_shape = shape
        elif shape != self.window_shape:
            raise DatasetError(f"window {window.stream_id}@{window.start_ns} has shape {shape}, "
                               f"the dataset holds {self.window_shape}")
        key = (window.stream_id, window.start_ns)
        if key in self.keys:
            self.skipped += 1
            return False
        self.keys.add(key)
        self.added += 1
        self._pending.append((window, _window_meta(window, label, split, info or {})))
        self.split_counts[split] = self.split_counts.get(split, 0) + 1
        self.label_counts[label] = self.label_counts.get(label, 0) + 1
        if len(self._pending) >= self.shard_size:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self.shards):05d}"
        frames = [f for w, _ in self._pending for f in w.frames]
        blobs = [f.data for f in frames]
        audio = [_audio_int16(w.audio) for w, _ in self._pending]
        masks = [np.packbits(np.asarray(w.audio_mask, bool)) for w, _ in self._pending]
        arrays: dict[str, np.ndarray] = {
            "frame_bytes": np.frombuffer(b"".join(blobs), np.uint8),
            "frame_offsets": np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64),
            "window_frames": np.cumsum([0] + [len(w.frames) for w, _ in self._pending],
                                       dtype=np.int64),
            "frame_ts": np.array([f.ts_ns for f in frames], np.int64),
            "frame_seq": np.array([f.seq for f in frames], np.int64),
            "frame_size": np.array([[f.width, f.height] for f in frames], np.int32
                                   ).reshape(-1, 2),
            "frame_png": np.array([f.fmt == "png" for f in frames], bool),
            "audio": np.concatenate(audio) if audio else np.zeros(0, "<i2"),
            "audio_offsets": np.cumsum([0] + [len(a) for a in audio], dtype=np.int64),
            "mask_bits": np.concatenate(masks) if masks else np.zeros(0, np.uint8),
            "mask_offsets": np.cumsum([0] + [len(m) for m in masks], dtype=np.int64),
        }
        buf = io.BytesIO()
        # mypy matches **arrays against savez's `allow_pickle: bool` too (numpy stubs)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        npz = buf.getvalue()
        meta = json.dumps([m for _, m in self._pending], ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
        _atomic_write(self.path / f"{name}.npz", npz)
        _atomic_write(self.path / f"{name}.json", meta)
        self.shards.append({"name": name, "count": len(self._pending),
                            "sha256": {"npz": _sha256(npz), "json": _sha256(meta)}})
        self._pending = []
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> None:
        # counts come from what the shards hold: a window still pending is not in them
        this = {**self.recording_source,
                "windows_added": self.added - len(self._pending),
                "windows_skipped_existing": self.skipped, "complete": complete,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "labels": self.labels, "count": sum(s["count"] for s in self.shards),
            "splits": self._counts_in_shards("split"),
            "label_counts": self._counts_in_shards("label"),
            "window": {**self.window_info, **(self.window_shape or {})},
            "source": self.source, "recordings": [*self.recordings, this],
            "shards": self.shards,
        }
        _atomic_write(self.path / MANIFEST,
                      json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
        _sync_dir(self.path)

    def _counts_in_shards(self, what: str) -> dict[str, int]:
        counts = dict(self.split_counts if what == "split" else self.label_counts)
        for _, m in self._pending:  # not written yet
            counts[m[what]] -= 1
            if not counts[m[what]]:
                del counts[m[what]]
        return counts

    def close(self) -> Path:
        """Write the remaining shard and the manifest (idempotent); releases the lock."""
        if self._closed:
            return self.path
        try:
            self._flush()
            self._write_manifest(complete=True)
        finally:
            self._closed = True
            self._lock.close()
        return self.path


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


class Dataset:
    """A dataset directory: ``labels``, split sizes, and its examples in write order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mfile = self.path / MANIFEST
        if not mfile.is_file():
            raise DatasetError(f"{self.path} is not a streamproc dataset (no {MANIFEST}); "
                               "write one with `streamproc record` or `streamproc avdigits`")
        try:
            self.manifest = json.loads(mfile.read_text("utf-8"))
        except ValueError as e:
            raise DatasetError(f"{mfile} is not valid JSON: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise DatasetError(f"{mfile} is not a streamproc dataset manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{mfile} has dataset format version "
                               f"{self.manifest.get('format_version')!r}; this streamproc "
                               f"reads version {FORMAT_VERSION}")
        self.labels: list[str] = list(self.manifest["labels"])
        self.splits: dict[str, int] = dict(self.manifest.get("splits", {}))

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def window(self) -> dict[str, Any]:
        return dict(self.manifest.get("window", {}))

    def _read(self, file: Path, digest: str) -> bytes:
        try:
            data = file.read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read {file}: {e}") from None
        if _sha256(data) != digest:
            raise DatasetError(f"{file} does not match the digest in {MANIFEST}: the shard was "
                               "modified or is incomplete")
        return data

    def _shard(self, shard: dict[str, Any]) -> Iterator[Example]:
        name = shard["name"]
        raw = self._read(self.path / f"{name}.npz", shard["sha256"]["npz"])
        metas = json.loads(self._read(self.path / f"{name}.json", shard["sha256"]["json"]))
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        fb, fo, wf = a["frame_bytes"], a["frame_offsets"], a["window_frames"]
        for i, m in enumerate(metas):
            frames = []
            for j in range(wf[i], wf[i + 1]):
                w_, h_ = (int(x) for x in a["frame_size"][j])
                frames.append(VideoFrame(
                    m["stream_id"], int(a["frame_ts"][j]), int(a["frame_seq"][j]),
                    fb[fo[j]:fo[j + 1]].tobytes(), "png" if a["frame_png"][j] else "jpeg",
                    w_, h_))
            audio = a["audio"][a["audio_offsets"][i]:a["audio_offsets"][i + 1]]
            bits = a["mask_bits"][a["mask_offsets"][i]:a["mask_offsets"][i + 1]]
            mask = np.unpackbits(bits, count=len(audio)).astype(bool)
            segments = [TranscriptSegment(m["stream_id"], s.get("seq", 0), s["text"],
                                          s["start_ns"], s["end_ns"], s.get("final", True),
                                          s.get("confidence"), s.get("lang"),
                                          words=None if s.get("words") is None else tuple(
                                              Word(w["text"], w["start_ns"], w["end_ns"])
                                              for w in s["words"]))
                        for s in m["segments"]]
            window = Window(
                m["stream_id"], m["start_ns"], m["end_ns"], frames, m["frame_count"],
                audio.astype(np.float32) / 32768.0, mask, m["sample_rate"], segments,
                dict(m["present"]), dict(m["quality"]),
                {mod: [Source(*s) for s in srcs] for mod, srcs in m["provenance"].items()})
            yield Example(window, m["label"], m["split"], m.get("info", {}))

    def index(self) -> list[WindowRef]:
        """Every window's stream, span, label and split, in write order, from the shards'
        metadata only (no frames or audio are read)."""
        out = []
        for shard in self.manifest["shards"]:
            name = shard["name"]
            metas = json.loads(self._read(self.path / f"{name}.json", shard["sha256"]["json"]))
            out += [WindowRef(m["stream_id"], m["start_ns"], m["end_ns"], m["label"],
                              m["split"]) for m in metas]
        return out

    def examples(self, split: str | None = None) -> Iterator[Example]:
        """Examples in write order, optionally of one split."""
        for shard in self.manifest["shards"]:
            for ex in self._shard(shard):
                if split is None or ex.split == split:
                    yield ex

    def load(self, split: str | None = None) -> list[Example]:
        return list(self.examples(split))


# ---------------------------------------------------------------------------------------
# labels files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSpan:
    """One labelled stretch of a stream: seconds from the stream's origin, or (``absolute``)
    seconds since the epoch."""

    stream_id: str
    start_s: float
    end_s: float
    label: str
    absolute: bool = False

    def bounds_ns(self, origin_ns: int) -> tuple[int, int]:
        base = 0 if self.absolute else origin_ns
        return base + round(self.start_s * NS_PER_S), base + round(self.end_s * NS_PER_S)


@dataclass
class LabelSpans:
    """Which label each stretch of each stream has."""

    spans: list[LabelSpan] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Labels in order of first appearance."""
        return list(dict.fromkeys(s.label for s in self.spans))

    @property
    def streams(self) -> set[str]:
        return {s.stream_id for s in self.spans}

    @property
    def relative(self) -> bool:
        """Whether any span is relative to the stream's origin."""
        return any(not s.absolute for s in self.spans)

    def label_for(self, stream_id: str, start_ns: int, end_ns: int, origin_ns: int,
                  min_overlap: float = 0.75) -> str | None:
        """The label whose span covers at least ``min_overlap`` of the window, else None."""
        length = end_ns - start_ns
        best, best_cover = None, 0
        for s in self.spans:
            if s.stream_id != stream_id:
                continue
            lo_s, hi_s = s.bounds_ns(origin_ns)
            lo, hi = max(start_ns, lo_s), min(end_ns, hi_s)
            if hi - lo > best_cover:
                best, best_cover = s.label, hi - lo
        return best if length > 0 and best_cover >= min_overlap * length else None

    def write(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["stream_id", "start", "end", "label"])
            for s in self.spans:
                w.writerow([s.stream_id, _format_time(s.start_s, s.absolute),
                            _format_time(s.end_s, s.absolute), s.label])


def _format_time(t: float, absolute: bool) -> str:
    if not absolute:
        return f"{t:.3f}"
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds"
                                                          ).replace("+00:00", "Z")


def _parse_time(text: str) -> tuple[float, bool] | None:
    """(seconds, absolute) of a labels-file time, or None when it is neither form."""
    try:
        return float(text), False
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        raise ValueError("no time zone")
    return when.timestamp(), True


#: Accepted header lines (``start_s``/``end_s``: the first spelling, still read).
LABEL_HEADERS = (["stream_id", "start", "end", "label"], ["stream_id", "start_s", "end_s", "label"])


def read_labels(path: str | Path) -> LabelSpans:
    """Parse a labels CSV; a bad line is an error naming its line number."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read labels file {path}: {e}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] not in LABEL_HEADERS:
        raise DatasetError(f"{path}:1: the header must be stream_id,start,end,label")
    spans = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row) or row[0].startswith("#"):
            continue
        if len(row) != 4:
            raise DatasetError(f"{path}:{n}: expected 4 fields, got {len(row)}")
        sid, a, b, label = (c.strip() for c in row)
        try:
            start, end = _parse_time(a), _parse_time(b)
        except ValueError:
            raise DatasetError(f"{path}:{n}: a date and time needs its time zone (Z for UTC, "
                               f"or e.g. +01:00), got {a!r}, {b!r}") from None
        if start is None or end is None:
            raise DatasetError(f"{path}:{n}: start and end must be seconds from the stream's "
                               "origin or ISO-8601 times with a zone "
                               f"(2026-11-30T09:15:00Z), got {a!r}, {b!r}")
        if start[1] != end[1]:
            raise DatasetError(f"{path}:{n}: start and end must both be seconds or both "
                               f"dates, got {a!r}, {b!r}")
        if not sid or not label or not 0 <= start[0] < end[0]:
            raise DatasetError(f"{path}:{n}: need a stream id, a label and 0 <= start < end")
        spans.append(LabelSpan(sid, start[0], end[0], label, start[1]))
    if not spans:
        raise DatasetError(f"{path}: no label spans")
    return LabelSpans(spans)
