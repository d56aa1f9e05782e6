"""aiokafka's connections read each response with one copy, a large one with none:
whatever chunks the socket delivers, through ``feed_data`` or into the reader's own buffers,
the reader hands back exactly the frames sent, and ends as asyncio's does."""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.worker import patches
from streamproc.worker.patches import FrameReader, _FrameProtocol


def _framed(bodies: list[bytes]) -> bytes:
    return b"".join(struct.pack(">i", len(b)) + b for b in bodies)


async def _read_frames(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    out = []
    for _ in range(n):  # a reader that loses bytes would wait for ever: fail instead
        (size,) = struct.unpack(">i", await asyncio.wait_for(reader.readexactly(4), 10))
        out.append(await asyncio.wait_for(reader.readexactly(size), 10))
    return out


def _fill(reader: FrameReader, data: bytes) -> None:
    """What a transport does for a buffered protocol: write into the reader's buffer."""
    while data:
        buf = reader.get_buffer(-1)
        assert len(buf)  # asyncio's transports refuse an empty buffer
        k = min(len(buf), len(data))
        buf[:k] = data[:k]
        reader.buffer_updated(k)
        data = data[k:]


def _read_chunked(bodies: list[bytes], cuts: list[int], into_buffers: bool) -> list[bytes]:
    """The frames read back from ``bodies`` delivered in chunks cut at ``cuts``, through
    ``feed_data`` or written into the reader's buffers."""
    async def run() -> list[bytes]:
        reader = FrameReader(asyncio.get_running_loop())
        data = _framed(bodies)
        edges = sorted({0, len(data), *(c for c in cuts if c < len(data))})

        async def feed() -> None:
            for a, b in itertools.pairwise(edges):
                if into_buffers:
                    _fill(reader, data[a:b])
                else:
                    reader.feed_data(data[a:b])
                await asyncio.sleep(0)

        feeding = asyncio.ensure_future(feed())
        got = await _read_frames(reader, len(bodies))
        await feeding
        assert reader._held == 0 and not reader._chunks and reader._target is None
        return got

    return asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
       cuts=st.lists(st.integers(0, 2000), max_size=12),
       into_buffers=st.booleans())
def test_any_chunking_gives_back_the_frames_sent(bodies: list[bytes], cuts: list[int],
                                                 into_buffers: bool) -> None:
    assert _read_chunked(bodies, cuts, into_buffers) == bodies


@settings(max_examples=300, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
       cuts=st.lists(st.integers(0, 2000), max_size=12),
       into_buffers=st.booleans())
def test_large_reads_received_in_place_give_back_the_frames_sent(
        bodies: list[bytes], cuts: list[int], into_buffers: bool) -> None:
    direct = patches.DIRECT_READ_MIN
    patches.DIRECT_READ_MIN = 16  # bodies of 16 bytes or more take the in-place path
    try:
        assert _read_chunked(bodies, cuts, into_buffers) == bodies
    finally:
        patches.DIRECT_READ_MIN = direct


@pytest.mark.parametrize("protocol", [asyncio.StreamReaderProtocol, _FrameProtocol])
def test_large_frames_over_a_real_socket_come_back_whole(protocol: type) -> None:
    # 5 MB responses arrive in many recv() chunks; small ones share chunks
    bodies = [os.urandom(5_000_000), b"", b"x" * 7, os.urandom(300_000), os.urandom(64)]
    received_in_place: list[int] = []

    async def run() -> list[bytes]:
        async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(_framed(bodies))
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        reader = FrameReader(loop)
        closed = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: protocol(reader, loop=loop) if protocol is asyncio.StreamReaderProtocol
            else protocol(closed, reader, loop=loop), "127.0.0.1", port)
        fill = reader.buffer_updated

        def counting(nbytes: int) -> None:  # bytes the socket wrote into a read's buffer
            if reader._into_target:
                received_in_place.append(nbytes)
            fill(nbytes)

        reader.buffer_updated = counting  # type: ignore[method-assign]
        try:
            got = await _read_frames(reader, len(bodies))
            with pytest.raises(asyncio.IncompleteReadError):  # the server closed: EOF
                await reader.readexactly(4)
            assert reader.at_eof()
            return got
        finally:
            transport.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(run()) == bodies
    if protocol is _FrameProtocol:
        # most of the large bodies never passed through Python: only what the socket
        # delivered before each read began went through the reader's small buffer
        assert sum(received_in_place) > 0.75 * 5_300_000


def test_a_frame_cut_short_by_eof_is_an_incomplete_read_with_what_came() -> None:
    async def run() -> None:
        reader = FrameReader(asyncio.get_running_loop())
        reader.feed_data(struct.pack(">i", 10) + b"abc")
        reader.feed_data(b"de")
        reader.feed_eof()
        assert await reader.readexactly(4) == struct.pack(">i", 10)
        assert not reader.at_eof()
        with pytest.raises(asyncio.IncompleteReadError) as err:
            await reader.readexactly(10)
        assert err.value.partial == b"abcde" and err.value.expected == 10
        assert reader.at_eof()

    asyncio.run(run())


def test_a_connection_error_reaches_the_waiting_read() -> None:
    async def run() -> None:
        reader = FrameReader(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(reader.readexactly(4))
        await asyncio.sleep(0)
        reader.set_exception(ConnectionResetError("reset by peer"))
        with pytest.raises(ConnectionResetError):
            await waiting
        with pytest.raises(ConnectionResetError):  # and every later one
            await reader.readexactly(1)

    asyncio.run(run())


def test_a_negative_size_is_refused_and_leaves_the_reader_as_it_was() -> None:
    async def run() -> None:
        reader = FrameReader(asyncio.get_running_loop())
        reader.feed_data(b"abcdefgh")
        with pytest.raises(ValueError):
            await reader.readexactly(-1)
        assert await asyncio.wait_for(reader.readexactly(8), 5) == b"abcdefgh"

    asyncio.run(run())


# Run in a fresh interpreter: malloc hands out reused memory, and memory an earlier array
# had advised keeps the kernel's flag, so only a fresh heap shows what one call asks for.
_HUGE_PAGE_CHECK = """
import numpy as np
from pathlib import Path
from streamproc.worker.patches import receive_buffer

def flags(address):
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise LookupError(hex(address))

size = 8 << 20  # above numpy's 4 MiB threshold for asking
plain = np.empty(size, np.uint8)
buf = receive_buffer(size)
after = np.empty(size, np.uint8)
print("hg" in flags(plain.ctypes.data + size // 2),
      "hg" in flags(np.frombuffer(buf, np.uint8).ctypes.data + size // 2),
      "hg" in flags(after.ctypes.data + size // 2), len(buf) == size and not buf.readonly)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's smaps")
def test_receive_buffers_ask_for_no_huge_pages() -> None:
    out = subprocess.run([sys.executable, "-c", _HUGE_PAGE_CHECK], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    plain, buffer, after, usable = (word == "True" for word in out)
    if not plain:
        pytest.skip("numpy asks for no huge pages here (kernel, settings)")
    assert not buffer and usable
    assert after  # other arrays keep numpy's default
