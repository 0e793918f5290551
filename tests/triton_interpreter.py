"""Running Triton kernels on a CPU: Triton's interpreter, in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(code: str) -> None:
    """Run ``code`` in a process where Triton interprets its kernels on the CPU (Triton reads
    TRITON_INTERPRET when it is first imported: its library's own jit functions are built
    then, so the test process cannot switch over); fails with the process's error output."""
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        # its interpreter cannot loop over a range whose bounds were loaded (the compiler can)
        pytest.skip(f"Triton {triton.__version__}'s interpreter; the test needs 3.7 or later")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
