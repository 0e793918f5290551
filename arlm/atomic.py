"""The one atomic writer: a file appears whole or not at all.

Everything arlm writes goes through a temporary file beside the target (same filesystem, so
the rename is atomic), synced to disk before the rename. A crash or an error leaves the old
file, or none, and no temporary behind. Multi-file checkpoints build on this in
``arlm.formats.checkpoint`` (a staging folder committed as a unit).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write (a file, or a folder with ``directory``);
    it replaces ``path`` when the block ends without an error and is removed when it fails.
    A folder target must be absent or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            if path.exists():
                path.rmdir()  # empty: a folder with contents is never replaced
            os.rename(tmp, path)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
