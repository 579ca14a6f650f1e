"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = ".tmp", durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` (``.<name>.<random><suffix>``) to write to;
    when the block ends without an error it is renamed over ``path``, otherwise removed. A
    crash or a full disk leaves the old file or the new one, never half of one. ``durable``:
    flush the file and the rename to disk as well (checkpoints). ``suffix``: for writers that
    insist on an extension (``torch.export`` wants ``.pt2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide exports from other users
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        try:
            os.replace(tmp, path)
        except OSError as err:  # name the file the user asked for, not the temporary one
            raise type(err)(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent, os.O_RDONLY)  # the rename itself


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
