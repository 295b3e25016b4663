"""Advisory file locks (fcntl), the one way vlaops keeps two processes off the same resource.

The kernel releases an ``flock`` when its holder dies, however it dies, so a SIGKILLed process never
leaves a lock behind that someone must delete by hand. The lock file holds ``pid@host`` of the holder
so that the process refused can say who has it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path


class LockHeld(Exception):
    """The lock is held by another process; ``holder`` is its ``pid@host`` (or '' when unknown)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


def holder_id() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], wait: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    ``wait``: block until it is free (a short critical section, e.g. a store's set-up); otherwise raise
    :class:`LockHeld` at once (a resource a process keeps for hours, e.g. a checkpoint directory).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            raise LockHeld(path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_id().encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
