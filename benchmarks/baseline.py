"""Another commit's arlm beside this one's, for before/after runs in one benchmark.

``checkout(commit)`` unpacks that commit's ``arlm`` package (a ``git archive`` of it) into a
temporary folder; a subprocess with that folder first on ``PYTHONPATH`` (``env``) imports the
commit's code instead of the checkout's, so one run measures both on the same machine state.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """A folder holding ``commit``'s ``arlm`` package, removed on leaving."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "arlm"], capture_output=True
    )
    if archive.returncode:
        raise SystemExit(f"--baseline {commit}: {archive.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory(prefix=f"arlm-{commit}-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


def env(folder: Path) -> dict[str, str]:
    """This process's environment with ``folder``'s code first on the import path."""
    return {**os.environ, "PYTHONPATH": str(folder)}
