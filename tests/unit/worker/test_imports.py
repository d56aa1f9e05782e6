"""What importing the worker loads: everything the event loop calls, and no model stack."""

from __future__ import annotations

import subprocess
import sys


def test_an_align_only_worker_loads_its_libraries_up_front_and_not_torch() -> None:
    # torch costs an align-only worker about 500 MB and seconds of start-up for nothing;
    # a worker serving a model imports it when it loads the model, before the loop runs
    code = ("import sys, streamproc.worker.app; "
            "need = ['faust', 'aiokafka', 'scipy.signal', 'streamproc.align.aligner', "
            "'streamproc.wire.codec', 'streamproc.inference.reload']; "
            "print([m for m in need if m not in sys.modules], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[] False"
