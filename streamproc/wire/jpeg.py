"""A JPEG's structure checked the way libjpeg reads it, without decoding a pixel.

The worker checks every frame at the door so a corrupt one becomes a dead letter, not a
failed model batch. Decoding each frame for that (even at 1/8 scale) cost about half of the
worker's time per window on W1 (docs/benchmarks.md, *Pipeline*). libjpeg fails a decode only
in its marker and table parsing: damage inside the entropy-coded data is a warning (it fills
in grey) unless it forms a marker. So this module walks the markers, the tables and the
scans with every check that is fatal in libjpeg (jdmarker.c, jdhuff.c, jdinput.c), and is
stricter where libjpeg only warns (bytes between segments, a missing end-of-image marker).
tests/unit/wire/test_jpeg.py holds it to that: on thousands of damaged JPEGs it rejects every one
that OpenCV cannot decode, and it accepts every intact image OpenCV writes.
"""

from __future__ import annotations

import os
import re
import struct

import numpy as np

# The marker that ends a scan's entropy-coded data: 0xFF followed by anything but a stuffed
# zero, a restart marker or a fill byte (a run of fill bytes matches at its last 0xFF).
# A literal first byte keeps the search in C at about 0.3 ns a byte.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MAX_DIM = 65500  # JPEG_MAX_DIMENSION
# OpenCV refuses to decode more pixels than this (its default, or the environment's)
_MAX_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
_MAX_BLOCKS_IN_MCU = 10


class JpegError(ValueError):
    """The bytes are not a JPEG that libjpeg would decode; the message says where."""


#: Headers (start of image to the end of the first scan's header) of single-scan JPEGs that
#: passed, with their image size and whether their scans can hold restart markers. A
#: camera's frames share their header, so a frame then costs one walk over its segment
#: lengths and the search for the end of its scan.
_PASSED: dict[bytes, tuple[tuple[int, int], bool]] = {}
_PASSED_MAX = 64
#: Longer headers (a big EXIF or comment segment) are not remembered: memory stays small,
#: and a camera that stamps each frame there would never hit anyway.
_PASSED_HEADER_MAX = 64 * 1024
#: Scans at least this long are first searched with numpy, which compares every byte at
#: SIMD speed but costs about 8 µs in calls (the regex's cost grows from 2 µs at 2 KB).
_VECTOR_SCAN_MIN = 24 * 1024


def _first_scan_data(data: bytes) -> int | None:
    """Where the first scan's entropy-coded data starts, walking segment lengths only
    (None for anything unusual: the full check then decides)."""
    n, i = len(data), 2
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if not 0xC0 <= marker <= 0xFE or marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
        if marker == 0xDA:
            return i if i <= n else None
    return None


def check_structure(data: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG libjpeg will decode, else :class:`JpegError`."""
    start = _first_scan_data(data) if data.startswith(b"\xff\xd8") else None
    if start is not None:
        known = _PASSED.get(data[:start])
        # the same header, then one scan and the end-of-image marker: what the full check
        # does after that header, and nothing else it could object to
        if known is not None and data.endswith(b"\xff\xd9") and \
                _one_scan_to_end(data, start, restarts=known[1]):
            return known[0]
    size = _check(data)
    if start is not None and start <= _PASSED_HEADER_MAX and data.endswith(b"\xff\xd9") \
            and _one_scan_to_end(data, start, restarts=True):
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.clear()
        header = data[:start]
        # a restart interval (DRI segment, FF DD) puts restart markers in every scan; the
        # same two bytes inside a table only cost the faster search
        _PASSED[header] = (size, b"\xff\xdd" in header)
    return size


def _one_scan_to_end(data: bytes, start: int, restarts: bool) -> bool:
    """Whether the entropy-coded data from ``start`` holds no marker before the
    end-of-image marker that ends ``data``. ``restarts``: the scan may hold restart
    markers (the numpy search, which only knows stuffed zeros, would be wasted)."""
    n = len(data)
    if not restarts and n - start >= _VECTOR_SCAN_MIN:
        # An encoder stuffs a zero after every 0xFF of its data: when every 0xFF before the
        # final marker is followed by a zero there is no marker (restart markers and fill
        # bytes, which are allowed, make the counts differ: the search below decides).
        span = n - 2 - start
        ff = np.frombuffer(data, np.uint8, span, start) == 0xFF
        stuffed = ff & (np.frombuffer(data, np.uint8, span, start + 1) == 0)
        if np.count_nonzero(ff) == np.count_nonzero(stuffed):
            return True
    m = _SCAN_END.search(data, start)
    return m is not None and m.start() == n - 2


def _check(data: bytes) -> tuple[int, int]:
    n = len(data)
    if not data.startswith(b"\xff\xd8"):
        raise JpegError("no FFD8 start-of-image marker")
    frame: dict | None = None  # SOF: precision, size, components {id: (h, v, tq)}
    qtables: set[int] = set()
    dc: dict[int, bytes] = {}  # Huffman tables: id -> counts + symbols
    ac: dict[int, bytes] = {}
    scans = 0
    single_scan = False
    i = 2
    while True:
        if i + 2 > n:
            raise JpegError(f"truncated: no end-of-image marker in its {n} bytes")
        if data[i] != 0xFF:
            raise JpegError(f"byte {i}: expected a marker, found 0x{data[i]:02X}")
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes before a marker
            i += 1
        if i + 2 > n:
            raise JpegError(f"truncated: no end-of-image marker in its {n} bytes")
        marker = data[i + 1]
        at = i
        i += 2
        if marker == 0xD9:  # EOI
            if scans == 0:
                raise JpegError("end-of-image marker before any image data")
            return frame["width"], frame["height"]  # type: ignore[index]
        if marker == 0xD8:
            raise JpegError(f"byte {at}: a second start-of-image marker")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no parameters
            continue
        if not (0xC0 <= marker <= 0xFE) or 0xF0 <= marker <= 0xFD or marker in (0xDE, 0xDF):
            raise JpegError(f"byte {at}: unknown marker 0x{marker:02X}")
        if i + 2 > n:
            raise JpegError(f"truncated inside the 0x{marker:02X} segment at byte {at}")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2 or i + length > n:
            raise JpegError(f"byte {at}: 0x{marker:02X} segment length {length} (the data "
                            f"has {n - i} bytes left)")
        body = data[i + 2:i + length]
        i += length
        if marker in _SOF_SUPPORTED:
            if frame is not None:
                raise JpegError(f"byte {at}: a second frame header (SOF)")
            frame = _sof(body, at, progressive=marker == 0xC2)
        elif marker in _SOF_OTHER or marker in (0xC8, 0xCC):  # JPG, DAC: arithmetic coding
            raise JpegError(f"byte {at}: marker 0x{marker:02X} (arithmetic-coded, lossless or "
                            "hierarchical JPEG) is not supported; baseline, extended and "
                            "progressive Huffman JPEGs are")
        elif marker == 0xC4:
            _dht(body, at, dc, ac)
        elif marker == 0xDB:
            _dqt(body, at, qtables)
        elif marker == 0xDD:
            if length != 4:
                raise JpegError(f"byte {at}: restart-interval segment of length {length}")
        elif marker == 0xDA:
            if frame is None:
                raise JpegError(f"byte {at}: scan (SOS) before the frame header (SOF)")
            if scans and single_scan:
                raise JpegError(f"byte {at}: a second scan in a single-scan image")
            comps = _sos(body, at, frame, qtables, dc, ac)
            if scans == 0:
                single_scan = not frame["progressive"] and comps == len(frame["components"])
            scans += 1
            m = _SCAN_END.search(data, i)
            if m is None:
                raise JpegError(f"truncated: no end-of-image marker in its {n} bytes")
            i = m.start()
        # else APPn, COM, DNL: skipped by length, as libjpeg does


def _sof(body: bytes, at: int, progressive: bool) -> dict:
    if len(body) < 6:
        raise JpegError(f"byte {at}: frame header (SOF) too short")
    precision, height, width, nf = struct.unpack_from(">BHHB", body)
    if precision != 8:
        raise JpegError(f"byte {at}: {precision}-bit samples (8-bit JPEG only)")
    if not (0 < height <= _MAX_DIM and 0 < width <= _MAX_DIM):
        raise JpegError(f"byte {at}: image size {width}x{height}")
    if width * height > _MAX_PIXELS:
        raise JpegError(f"byte {at}: {width}x{height} is over OpenCV's limit of {_MAX_PIXELS} "
                        "pixels (OPENCV_IO_MAX_IMAGE_PIXELS)")
    if nf not in (1, 3, 4):  # grey, YCbCr/RGB, CMYK/YCCK: what OpenCV converts to BGR
        raise JpegError(f"byte {at}: {nf} colour components")
    if len(body) != 6 + 3 * nf:
        raise JpegError(f"byte {at}: frame header length does not match {nf} components")
    comps: dict[int, tuple[int, int, int]] = {}
    for k in range(nf):
        cid, hv, tq = body[6 + 3 * k:9 + 3 * k]
        h, v = hv >> 4, hv & 15
        if not (1 <= h <= 4 and 1 <= v <= 4):
            raise JpegError(f"byte {at}: component {cid} sampling factors {h}x{v}")
        if tq > 3:
            raise JpegError(f"byte {at}: component {cid} uses quantisation table {tq}")
        if cid in comps:
            raise JpegError(f"byte {at}: component id {cid} twice in the frame header")
        comps[cid] = (h, v, tq)
    max_h = max(h for h, _, _ in comps.values())
    max_v = max(v for _, v, _ in comps.values())
    if any(max_h % h or max_v % v for h, v, _ in comps.values()):  # jdsample.c
        raise JpegError(f"byte {at}: sampling factors "
                        f"{', '.join(f'{h}x{v}' for h, v, _ in comps.values())} are fractional "
                        "(each must divide the largest)")
    return {"width": width, "height": height, "components": comps,
            "progressive": progressive, "latched": set()}


def _dqt(body: bytes, at: int, qtables: set[int]) -> None:
    j = 0
    while j < len(body):
        pq, tq = body[j] >> 4, body[j] & 15
        if tq > 3:
            raise JpegError(f"byte {at}: quantisation table index {tq}")
        if pq > 1:
            raise JpegError(f"byte {at}: quantisation table precision {pq}")
        j += 1 + 64 * (pq + 1)
        if j > len(body):
            raise JpegError(f"byte {at}: quantisation table segment length")
        qtables.add(tq)


def _dht(body: bytes, at: int, dc: dict[int, bytes], ac: dict[int, bytes]) -> None:
    j = 0
    while len(body) - j > 16:
        index = body[j]
        counts = body[j + 1:j + 17]
        total = sum(counts)
        j += 17
        if total > 256 or total > len(body) - j:
            raise JpegError(f"byte {at}: Huffman table with {total} codes")
        symbols = body[j:j + total]
        j += total
        table, tid = (ac, index - 0x10) if index & 0x10 else (dc, index)
        if not 0 <= tid <= 3:
            raise JpegError(f"byte {at}: Huffman table index 0x{index:02X}")
        table[tid] = counts + symbols
    if j != len(body):
        raise JpegError(f"byte {at}: Huffman table segment length")


def _huffman_ok(table: bytes | None, tid: int, is_dc: bool, sequential: bool) -> bool:
    """jpeg_make_d_derived_tbl's checks. In a sequential scan a missing table 0 or 1 is the
    standard one (libjpeg-turbo fills it in, for Motion-JPEG); a progressive scan has none."""
    if table is None:
        return sequential and tid <= 1
    code = 0  # canonical codes, shortest first; none may be all ones
    for length, count in enumerate(table[:16], start=1):
        code += count
        if code >= 1 << length:
            return False
        code <<= 1
    return not (is_dc and any(s > 15 for s in table[16:]))


def _sos(body: bytes, at: int, frame: dict, qtables: set[int],
         dc: dict[int, bytes], ac: dict[int, bytes]) -> int:
    if not body:
        raise JpegError(f"byte {at}: empty scan header (SOS)")
    ns = body[0]
    if not 1 <= ns <= 4 or len(body) != 4 + 2 * ns:
        raise JpegError(f"byte {at}: scan header (SOS) for {ns} components")
    ss, se, a = body[1 + 2 * ns], body[2 + 2 * ns], body[3 + 2 * ns]
    ah, al = a >> 4, a & 15
    comps = frame["components"]
    seen: set[int] = set()
    blocks = 0
    tables = []
    for k in range(ns):
        cid, t = body[1 + 2 * k], body[2 + 2 * k]
        if cid not in comps or cid in seen:
            raise JpegError(f"byte {at}: scan names component {cid}, not in the frame header")
        seen.add(cid)
        h, v, tq = comps[cid]
        blocks += h * v
        if cid not in frame["latched"]:  # libjpeg latches a component's table at its 1st scan
            if tq not in qtables:
                raise JpegError(f"byte {at}: component {cid} uses undefined quantisation "
                                f"table {tq}")
            frame["latched"].add(cid)
        tables.append((t >> 4, t & 15))
    if ns > 1 and blocks > _MAX_BLOCKS_IN_MCU:
        raise JpegError(f"byte {at}: {blocks} blocks per MCU (at most {_MAX_BLOCKS_IN_MCU})")
    if frame["progressive"]:
        bad = (se < ss or se > 63 or (ss == 0 and se != 0) or (ss > 0 and ns != 1)
               or (ah != 0 and al != ah - 1) or al > 13)
        if bad:
            raise JpegError(f"byte {at}: progressive scan parameters Ss={ss} Se={se} "
                            f"Ah={ah} Al={al}")
        need_dc, need_ac = ss == 0 and ah == 0, ss > 0
    else:
        need_dc, need_ac = True, True
    for td, ta in tables:
        if need_dc and not _huffman_ok(dc.get(td), td, True, not frame["progressive"]):
            raise JpegError(f"byte {at}: DC Huffman table {td} is missing or invalid")
        if need_ac and not _huffman_ok(ac.get(ta), ta, False, not frame["progressive"]):
            raise JpegError(f"byte {at}: AC Huffman table {ta} is missing or invalid")
    return ns
