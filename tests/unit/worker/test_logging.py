"""The worker's log level is what reaches the libraries: no debug records on the hot path."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_below_debug_no_library_builds_debug_records(level: str) -> None:
    # faust's terminal spinner would set the root logger to DEBUG at warning and above;
    # faust and aiokafka then build a record for each published message, to drop it
    code = ("import logging, faust\n"
            "from streamproc.worker.app import faust_worker\n"
            "app = faust.App('t', broker='kafka://localhost:1')\n"
            f"faust_worker(app, {level!r})._setup_logging()\n"
            "names = ['faust.topics', 'aiokafka.producer.producer', 'streamproc.worker']\n"
            "debug = [n for n in names if logging.getLogger(n).isEnabledFor(logging.DEBUG)]\n"
            f"own = logging.getLogger('streamproc.worker').isEnabledFor(logging.{level.upper()})\n"
            # faust sends print() to the log: write to the pipe itself
            "import os; os.write(1, f'{debug} {own}'.encode())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[] True"
