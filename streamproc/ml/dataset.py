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

A *labels file* says which label each stretch of a stream has (CSV, times in seconds
relative to the stream's origin)::

    stream_id,start_s,end_s,label
    cam1,0.000,2.000,seven
"""

from __future__ import annotations

import csv
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


class Example(NamedTuple):
    window: Window
    label: str
    split: str
    info: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    """Append labelled windows; ``close()`` writes the last shard and the manifest.

    ``window`` records how the windows were cut (``hop_ms``, ``frames_per_window``) in
    the manifest next to the window length and sample rate read from the windows.

    Audio is stored as 16-bit PCM (the wire's usual format; float input is clipped to
    [-1, 1]). ``labels`` fixes the class order; without it, labels are kept in order of
    first appearance. Use as a context manager: what was added is kept even when the
    producer of windows stops with an error or Ctrl-C.
    """

    def __init__(self, path: str | Path, *, labels: Sequence[str] | None = None,
                 source: dict[str, Any] | None = None, window: dict[str, Any] | None = None,
                 shard_size: int = 512, overwrite: bool = False) -> None:
        self.path = Path(path)
        if (self.path / MANIFEST).exists() and not overwrite:
            raise DatasetError(f"{self.path} already holds a dataset; choose another directory "
                               "or pass overwrite")
        self.path.mkdir(parents=True, exist_ok=True)
        for old in self.path.glob("shard-*"):
            old.unlink()
        self.fixed_labels = labels is not None
        self.labels: list[str] = list(labels or [])
        self.source = dict(source or {})
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self.split_counts: dict[str, int] = {}
        self.label_counts: dict[str, int] = {}
        self.window_shape: dict[str, Any] | None = None
        self.window_info = dict(window or {})  # e.g. hop_ms, frames_per_window
        self._pending: list[tuple[Window, dict[str, Any]]] = []
        self._closed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards) + len(self._pending)

    def add(self, window: Window, label: str, split: str = "train",
            info: dict[str, Any] | None = None) -> None:
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
        self._pending.append((window, _window_meta(window, label, split, info or {})))
        self.split_counts[split] = self.split_counts.get(split, 0) + 1
        self.label_counts[label] = self.label_counts.get(label, 0) + 1
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self.shards):05d}"
        frames = [f for w, _ in self._pending for f in w.frames]
        blobs = [f.data for f in frames]
        audio = [_audio_int16(w.audio) for w, _ in self._pending]
        masks = [np.packbits(np.asarray(w.audio_mask, bool)) for w, _ in self._pending]
        arrays = {
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
        np.savez(buf, **arrays)
        npz = buf.getvalue()
        meta = json.dumps([m for _, m in self._pending], ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
        _atomic_write(self.path / f"{name}.npz", npz)
        _atomic_write(self.path / f"{name}.json", meta)
        self.shards.append({"name": name, "count": len(self._pending),
                            "sha256": {"npz": _sha256(npz), "json": _sha256(meta)}})
        self._pending = []

    def close(self) -> Path:
        """Write the remaining shard and the manifest (idempotent)."""
        if self._closed:
            return self.path
        self._flush()
        self._closed = True
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "labels": self.labels, "count": sum(s["count"] for s in self.shards),
            "splits": self.split_counts, "label_counts": self.label_counts,
            "window": {**self.window_info, **(self.window_shape or {})},
            "source": self.source, "shards": self.shards,
        }
        _atomic_write(self.path / MANIFEST,
                      json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
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
    stream_id: str
    start_s: float
    end_s: float
    label: str


@dataclass
class LabelSpans:
    """Which label each stretch of each stream has; times relative to the stream origin."""

    spans: list[LabelSpan] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Labels in order of first appearance."""
        return list(dict.fromkeys(s.label for s in self.spans))

    def label_for(self, stream_id: str, start_ns: int, end_ns: int, origin_ns: int,
                  min_overlap: float = 0.75) -> str | None:
        """The label whose span covers at least ``min_overlap`` of the window, else None."""
        length = end_ns - start_ns
        best, best_cover = None, 0
        for s in self.spans:
            if s.stream_id != stream_id:
                continue
            lo = max(start_ns, origin_ns + round(s.start_s * NS_PER_S))
            hi = min(end_ns, origin_ns + round(s.end_s * NS_PER_S))
            if hi - lo > best_cover:
                best, best_cover = s.label, hi - lo
        return best if length > 0 and best_cover >= min_overlap * length else None

    def write(self, path: str | Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["stream_id", "start_s", "end_s", "label"])
            for s in self.spans:
                w.writerow([s.stream_id, f"{s.start_s:.3f}", f"{s.end_s:.3f}", s.label])


def read_labels(path: str | Path) -> LabelSpans:
    """Parse a labels CSV; a bad line is an error naming its line number."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read labels file {path}: {e}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != ["stream_id", "start_s", "end_s", "label"]:
        raise DatasetError(f"{path}:1: the header must be stream_id,start_s,end_s,label")
    spans = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row) or row[0].startswith("#"):
            continue
        if len(row) != 4:
            raise DatasetError(f"{path}:{n}: expected 4 fields, got {len(row)}")
        sid, a, b, label = (c.strip() for c in row)
        try:
            start, end = float(a), float(b)
        except ValueError:
            raise DatasetError(f"{path}:{n}: start_s and end_s must be numbers, "
                               f"got {a!r}, {b!r}") from None
        if not sid or not label or not 0 <= start < end:
            raise DatasetError(f"{path}:{n}: need a stream id, a label and 0 <= start_s < end_s")
        spans.append(LabelSpan(sid, start, end, label))
    if not spans:
        raise DatasetError(f"{path}: no label spans")
    return LabelSpans(spans)
