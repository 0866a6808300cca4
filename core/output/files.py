"""Files written atomically: a temporary file beside the target, flushed to disk, renamed over it.
A kill or a full disk leaves the previous file in place, never a half-written one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable

from lft.errors import LftError


class OutputError(LftError):
    """An output file cannot be written."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | Path, write: Callable[[Path], object], what: str = "file", error: type[LftError] = OutputError
) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, flush it to disk, then
    rename it to ``path``. On any failure the temporary file is removed and ``path`` keeps its
    previous content; an ``OSError`` (a full disk, a read-only folder) becomes a one-line
    ``error`` (``OutputError`` unless the caller names its own)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; follow the umask like open() does
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        kept = "; the previous one is kept" if path.exists() else ""
        hint = " (free some disk space, then continue with --resume)" if exc.errno == errno.ENOSPC else ""
        raise error(f"could not write the {what} {path}: {reason}{kept}{hint}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", Path(path).name)
