"""The worker freezes its start-up heap: full collections no longer walk modules, faust and
the model (60-155 ms a pass held the interpreter), and garbage made later is still
collected; glibc's malloc reuses the pages of freed megabyte buffers, and an idle worker
hands them back."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from streamproc.worker.app import IdleTrim


def test_settle_heap_freezes_start_up_objects_and_still_collects_later_garbage() -> None:
    # in a child: freezing is process-wide and would stay in pytest's own process
    code = (
        "import gc, json\n"
        "from streamproc.worker.app import GC_YOUNG_THRESHOLD, settle_heap\n"
        "before = len(gc.get_objects())\n"
        "line = settle_heap()\n"
        "frozen = gc.get_freeze_count()\n"
        "walked = len(gc.get_objects())\n"
        "class Node:\n"
        "    pass\n"
        "a, b = Node(), Node()\n"
        "a.other, b.other = b, a\n"
        "del a, b\n"
        "found = gc.collect()\n"
        "print(json.dumps([before, frozen, walked, found, gc.get_threshold()[0],\n"
        "                  GC_YOUNG_THRESHOLD, line]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    before, frozen, walked, found, young, threshold, line = json.loads(out)
    assert before > 20_000  # the worker's imports
    assert frozen >= before  # every object alive then is frozen ...
    assert walked < before // 20  # ... and out of the collector's reach
    assert found >= 2  # the cycle made afterwards is garbage the collector still finds
    assert young == threshold == 10_000
    assert line.startswith(f"heap: {frozen:,} start-up objects frozen (the collector skips "
                           "them); young collections every 10,000 allocations; malloc ")


# buffers like fetch responses (0.7-4.9 MB, a few alive at a time), made and freed 200
# times; prints the page faults they cost
_BUFFERS = (
    "import resource, sys\n"
    "from streamproc.worker.app import tune_malloc\n"
    "if sys.argv[1] == 'tuned':\n"
    "    assert tune_malloc()\n"
    "held = []\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for i in range(200):\n"
    "    held.append(b'\\x01' * ((i % 7 + 1) * 700_000))\n"
    "    if len(held) > 3:\n"
    "        held.pop(0)\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_malloc_reuses_freed_buffers_instead_of_faulting_pages_in() -> None:
    faults = {how: int(subprocess.run([sys.executable, "-c", _BUFFERS, how], check=True,
                                      capture_output=True, text=True).stdout)
              for how in ("tuned", "default")}
    # about 107,000 faults with glibc's defaults (each buffer mapped anew), under 5,000 tuned
    assert faults["default"] > 50_000
    assert faults["tuned"] < faults["default"] // 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_hands_freed_buffers_back() -> None:
    code = (
        "from streamproc.worker.app import trim_heap, tune_malloc\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
        "assert tune_malloc()\n"
        "held = [b'\\x01' * 2_000_000 for _ in range(100)]\n"
        "after = b'\\x02' * 1000\n"
        "peak = rss()\n"
        "held.clear()\n"
        "freed = rss()\n"
        "print(peak, freed, trim_heap(), rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    peak, freed, trimmed, after = int(out[0]), int(out[1]), out[2], int(out[3])
    assert freed > peak - 20  # kept for reuse: that is what the tuning is for
    assert trimmed == "True"
    assert after < freed - 150  # the 200 MB freed went back to the system


def test_idle_trim_is_due_once_each_time_input_stops() -> None:
    trim = IdleTrim()
    looks = [0, 0, 0, 10, 250, 250, 250, 250, 251, 251]
    assert [trim.due(n) for n in looks] == [
        False, True, False,  # idle from the start: once
        False, False, True, False, False,  # records came, then stopped: once more
        False, True,
    ]
