"""Transcript files and lines -> timed cues: SRT, WebVTT and JSONL.

Pure parsing, no Kafka. A malformed line never stops a file: it becomes a
:class:`ParseIssue` naming the file and line number, the cue it belongs to is skipped,
and every good cue is kept, so a producer can report the problem and send the rest.

JSONL: one object per line with ``text`` and optionally a span, either ``start_ns`` /
``end_ns`` (integer nanoseconds) or ``start`` / ``end`` (seconds), plus ``final``
(default true), ``confidence`` (0..1) and ``lang``. In a file the span is relative to
the start of the media; on ``produce transcript`` it is absolute (epoch); a line
without a span is stamped on arrival.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamproc.errors import UserError

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Cue:
    """A transcript span. Times are ns, relative or absolute as the source defines."""

    start_ns: int | None
    end_ns: int | None
    text: str
    final: bool = True
    confidence: float | None = None
    lang: str | None = None
    line: int = 0  # where the cue starts in its source, for messages


@dataclass(frozen=True)
class ParseIssue:
    """One bad line: ``str()`` gives ``file:line: what is wrong``."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass
class Parsed:
    cues: list[Cue] = field(default_factory=list)
    issues: list[ParseIssue] = field(default_factory=list)


class LineError(ValueError):
    """A line that cannot be used; the message says why."""


# --- lines -------------------------------------------------------------------------------


def _lines(data: str | bytes, source: str, issues: list[ParseIssue]) -> tuple[list[str], set[int]]:
    """Split into lines; a line that is not UTF-8 is reported, kept as a placeholder (so
    it still separates nothing and ends nothing) and its index returned in the bad set.
    A file with a UTF-16 byte order mark (what Windows editors save as "Unicode") is read
    as UTF-16."""
    if isinstance(data, bytes) and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            data = data.decode("utf-16")
        except UnicodeDecodeError as e:
            issues.append(ParseIssue(source, 1, f"UTF-16 text that does not decode ({e})"))
            return [], set()
    raw_lines: Sequence[str | bytes] = data.splitlines()
    out: list[str] = []
    bad: set[int] = set()
    for i, raw in enumerate(raw_lines):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.append(ParseIssue(source, i + 1, f"not UTF-8 (bad byte at column "
                                                        f"{e.start + 1}); line skipped"))
                out.append("\ufffd")
                bad.add(i)
                continue
        else:
            line = raw
        if i == 0:
            line = line.removeprefix("\ufeff")
        out.append(line.rstrip("\r"))
    return out, bad


# --- SRT and WebVTT ----------------------------------------------------------------------

_SRT_TIME = r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_VTT_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{2})\.(\d{3})"
_SRT_TIMING = re.compile(rf"^\s*{_SRT_TIME}\s*-->\s*{_SRT_TIME}(?:\s+.*)?$")
_VTT_TIMING = re.compile(rf"^\s*{_VTT_TIME}\s+-->\s+{_VTT_TIME}(?:\s+.*)?$")
_TAG = re.compile(r"<[^>]*>")
_OVERRIDE = re.compile(r"\{\\[^}]*\}")  # SubRip files carry ASS overrides such as {\an8}


def _to_ns(h: str | None, m: str, s: str, frac: str) -> int:
    if int(m) >= 60 or int(s) >= 60:
        raise LineError(f"minutes and seconds must be below 60 in {h or 0}:{m}:{s}")
    ms = int(frac.ljust(3, "0"))
    return ((int(h or 0) * 60 + int(m)) * 60 + int(s)) * NS_PER_S + ms * NS_PER_MS


def _timing_error(line: str, vtt: bool) -> str:
    want = "[HH:]MM:SS.mmm --> [HH:]MM:SS.mmm" if vtt else "HH:MM:SS,mmm --> HH:MM:SS,mmm"
    return f"bad timing line {line.strip()[:60]!r}; expected {want}"


def _timing(line: str, vtt: bool) -> tuple[int, int]:
    m = (_VTT_TIMING if vtt else _SRT_TIMING).match(line)
    if m is None:
        raise LineError(_timing_error(line, vtt))
    g = m.groups()
    start, end = _to_ns(*g[:4]), _to_ns(*g[4:])
    if end < start:
        raise LineError(f"cue ends before it starts ({line.strip()[:60]!r})")
    return start, end


def _parse_blocks(data: str | bytes, source: str, vtt: bool) -> Parsed:
    out = Parsed()
    lines, bad = _lines(data, source, out.issues)
    n = len(lines)
    i = 0
    if vtt:
        first = next((k for k, ln in enumerate(lines) if ln.strip()), None)
        if first is None or not lines[first].startswith("WEBVTT"):
            out.issues.append(ParseIssue(source, (first or 0) + 1,
                                         "WebVTT files start with a 'WEBVTT' line"))
        else:  # the header block runs to the first blank line (or a first cue's timing)
            i = first
            while i < n and lines[i].strip() and "-->" not in lines[i]:
                i += 1
    pending: list[list[tuple[int, str]]] = []  # the rest of a block that held two cues
    while i < n or pending:
        if pending:
            block = pending.pop()
        else:
            if not lines[i].strip():
                i += 1
                continue
            # a block runs to the next blank line
            start_i = i
            while i < n and lines[i].strip():
                i += 1
            block = [(k + 1, lines[k]) for k in range(start_i, i) if k not in bad]
        if not block:
            continue
        first_line = block[0][1]
        if vtt and first_line.split(maxsplit=1)[:1] in (["NOTE"], ["STYLE"], ["REGION"]):
            continue
        # the timing line: first line with "-->" among the first two (cue number / id first)
        t_idx = next((k for k, (_, ln) in enumerate(block[:2]) if "-->" in ln), None)
        if t_idx is None:
            if len(block) > 1 and (vtt or first_line.strip().isdigit()):
                # "N" (or a VTT cue id) followed by what should have been the timing line
                bad_no, bad_line = block[1]
                out.issues.append(ParseIssue(source, bad_no, f"{_timing_error(bad_line, vtt)}; "
                                                             "cue skipped"))
                continue
            out.issues.append(ParseIssue(
                source, block[0][0],
                f"expected a cue {'identifier' if vtt else 'number'} or timing line, got "
                f"{first_line.strip()[:60]!r}; block skipped"))
            continue
        # a cue written without the blank line after the one before: a timing line among
        # the text starts it (with its number line, if any)
        nxt = next((k for k in range(t_idx + 1, len(block))
                    if (_VTT_TIMING if vtt else _SRT_TIMING).match(block[k][1])), None)
        if nxt is not None:
            cut = nxt - 1 if nxt - 1 > t_idx and block[nxt - 1][1].strip().isdigit() else nxt
            pending.append(block[cut:])
            block = block[:cut]
        t_line_no, t_line = block[t_idx]
        try:
            start, end = _timing(t_line, vtt)
        except LineError as e:
            out.issues.append(ParseIssue(source, t_line_no, f"{e}; cue skipped"))
            continue
        text_lines = []
        for _, ln in block[t_idx + 1:]:
            ln = _TAG.sub("", ln)  # <i>, <b>, <font ...> in SubRip; VTT's cue tags
            ln = html.unescape(ln) if vtt else _OVERRIDE.sub("", ln)
            text_lines.append(ln.strip())
        text = "\n".join(t for t in text_lines if t)
        if not text:
            out.issues.append(ParseIssue(source, t_line_no, "cue has no text; skipped"))
            continue
        out.cues.append(Cue(start, end, text, line=block[0][0]))
    return out


def parse_srt(data: str | bytes, source: str = "<srt>") -> Parsed:
    """SubRip: ``N`` / ``HH:MM:SS,mmm --> HH:MM:SS,mmm`` / text lines / blank line;
    formatting tags (``<i>``, ``<font>``) and ASS overrides (``{\\an8}``) are stripped."""
    return _parse_blocks(data, source, vtt=False)


def parse_vtt(data: str | bytes, source: str = "<vtt>") -> Parsed:
    """WebVTT cues; NOTE/STYLE/REGION blocks are skipped, cue tags are stripped."""
    return _parse_blocks(data, source, vtt=True)


# --- JSONL ---------------------------------------------------------------------------


def _span_value(obj: dict, ns_key: str, s_key: str) -> int | None:
    if ns_key in obj:
        v = obj[ns_key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise LineError(f"{ns_key!r} must be a non-negative integer, got {v!r:.40}")
        return v
    if s_key in obj:
        v = obj[s_key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise LineError(f"{s_key!r} must be a non-negative number of seconds, got {v!r:.40}")
        return round(v * NS_PER_S)
    return None


def parse_json_cue(line: str, lineno: int = 0) -> Cue:
    """One JSONL line -> Cue; LineError says what is wrong with it."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise LineError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise LineError("field 'text' is missing or not a string")
    if not text.strip():
        raise LineError("field 'text' is empty")
    start = _span_value(obj, "start_ns", "start")
    end = _span_value(obj, "end_ns", "end")
    if (start is None) != (end is None):
        raise LineError("give both ends of the span (start_ns and end_ns, or start and end) "
                        "or neither")
    if start is not None and end is not None and end < start:
        raise LineError(f"span ends before it starts ({start} > {end})")
    final = obj.get("final", True)
    if not isinstance(final, bool):
        raise LineError(f"field 'final' must be true or false, got {final!r:.40}")
    conf = obj.get("confidence")
    if conf is not None and (isinstance(conf, bool) or not isinstance(conf, (int, float))
                             or not 0.0 <= conf <= 1.0):
        raise LineError(f"field 'confidence' must be a number in [0, 1], got {conf!r:.40}")
    lang = obj.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise LineError(f"field 'lang' must be a string, got {lang!r:.40}")
    return Cue(start, end, text, final, None if conf is None else float(conf), lang, lineno)


def parse_jsonl(data: str | bytes, source: str = "<jsonl>", require_span: bool = True) -> Parsed:
    """JSON Lines; blank lines are ignored. Files need spans (``require_span``)."""
    out = Parsed()
    lines, bad = _lines(data, source, out.issues)
    for no, line in enumerate(lines, start=1):
        if no - 1 in bad or not line.strip():
            continue
        try:
            cue = parse_json_cue(line, no)
            if require_span and cue.start_ns is None:
                raise LineError("no span: give start_ns/end_ns or start/end")
        except LineError as e:
            out.issues.append(ParseIssue(source, no, f"{e}; line skipped"))
            continue
        out.cues.append(cue)
    return out


# --- files ---------------------------------------------------------------------------

FORMATS = ("srt", "vtt", "jsonl")
_SUFFIX_FORMATS = {"srt": "srt", "vtt": "vtt", "jsonl": "jsonl", "ndjson": "jsonl",
                  "json": "jsonl"}


def suffix_format(path: str | Path) -> str | None:
    """The transcript format ``path``'s extension names, or None."""
    return _SUFFIX_FORMATS.get(Path(path).suffix.lower().lstrip("."))


def sniff_format(path: Path, head: bytes) -> str:
    """By extension, else by content: WEBVTT header, a JSON object, or SRT."""
    fmt = suffix_format(path)
    if fmt is not None:
        return fmt
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"WEBVTT"):
        return "vtt"
    if text.startswith(b"{"):
        return "jsonl"
    return "srt"


def load_transcript(path: str | Path, fmt: str | None = None) -> Parsed:
    """Parse a transcript file; UserError when it cannot be read at all."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read transcript {p}: {e.strerror or e}") from None
    fmt = fmt or sniff_format(p, data[:64])
    if fmt not in FORMATS:
        raise UserError(f"transcript format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    parser = {"srt": parse_srt, "vtt": parse_vtt, "jsonl": parse_jsonl}[fmt]
    return parser(data, str(p))
