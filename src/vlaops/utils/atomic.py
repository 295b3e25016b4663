"""Atomic outputs: a stage writes into a temporary sibling and renames it at the end.

A crash (or SIGKILL) mid-write therefore leaves either the previous complete output or nothing,
never half a dataset or checkpoint that a later stage would take as whole.

Each temporary (``.<name>.tmp-*`` beside ``<name>``) is held under an exclusive ``flock`` by the process
writing it, for as long as it writes. The kernel drops that lock when the process dies, however it dies,
so the next write of the same output can tell a temporary left by a killed run (lockable: removed, and
logged) from one another process is writing right now (locked: left alone). A rename keeps the
temporary's mode, and ``mkdtemp``/``mkstemp`` create 0700/0600, so the temporary gets the mode a plain
``mkdir``/``open`` would have given under the user's umask before it is renamed into place: group
members on shared storage can read the outputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlaops.utils.logging import get_logger

log = get_logger(__name__)


def temp_prefix(target: Path) -> str:
    """The name every temporary of ``target`` starts with."""
    return f".{target.name}.tmp-"


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``target`` that no live process holds (left by a killed run); log each.

    Returns the paths removed. A temporary being written by another process keeps its lock and is kept.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for p in sorted(target.parent.glob(f"{temp_prefix(target)}*")):
        fd = _try_lock(p)
        if fd is None:
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        finally:
            os.close(fd)
        log.warning("removed %s: a temporary of %s left by an interrupted run", p, target.name)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    lock = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until renamed or removed: this temporary is alive
        tmp.chmod(0o777 & ~current_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)
        raise
    try:
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f"{temp_prefix(target)}old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        os.close(lock)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; it is fsynced and renamed over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the handle closes, after the rename
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON, atomically."""
    with atomic_file(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
