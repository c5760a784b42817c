"""Small file helpers shared by the stores and the models: streamed sha256, crash-safe whole-file writes,
and the UTC timestamp written into manifests and logs."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

BLOCK = 1 << 20  # bytes read per step while hashing


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Hex sha256 over the bytes of ``paths`` one after the other (streamed in 1 MiB blocks)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(BLOCK):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    return sha256_files([path])


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by name (a folder: so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(f)`` writes: a temp file ``.<name>.*.tmp`` beside it,
    fsynced, then renamed over ``path``. On any error the temp file is removed and ``path`` is
    left as it was. Temp files of ``path`` that a killed writer left (its process is gone, or the
    file is older than 10 s) are removed first."""
    path = Path(path)
    drop_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def drop_stale_temps(path: Path) -> int:
    """Remove the ``.<name>.[PID.]*.tmp`` files beside ``path`` whose writer is dead: the PID in the
    name is not running here, or the file was not written for 10 s. Returns how many went."""
    n = 0
    pid_of = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            m = pid_of.match(stale.name)
            if time.time() - stale.stat().st_mtime > 10 or (m and not _running(int(m.group(1)))):
                stale.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, data: Any) -> None:
    """``write_atomic`` of ``data`` as indented JSON with sorted keys (and a final newline)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. ``2026-12-01T08:37:07+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
