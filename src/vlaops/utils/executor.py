"""The executor seam for embarrassingly parallel work (DESIGN.md "Compute").

``map_ordered(fn, items, num_workers, ...)`` returns ``[fn(item) for item in items]`` whatever the number
of workers: items are handed out by index and the results merged by index, so an output never depends
on how many processes computed it or in which order they finished. One worker runs in this process
(no pickling, plain tracebacks); more run in a local process pool. A cluster backend (Ray) would be
another branch here, with the same contract.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from typing import Any, Optional, TypeVar

from tqdm import tqdm

from vlaops.utils.signals import raise_if_signalled

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(num_workers: Optional[int]) -> int:
    """0 or None: one worker per CPU core this process may use."""
    if num_workers:
        return int(num_workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def start_method(needs_spawn: bool = False) -> str:
    """fork where there is one (collect in ``sim/record.py`` uses it too): the children inherit the imported
    modules instead of re-importing the caller's ``__main__`` (which breaks unguarded scripts). spawn when
    the parent holds state a forked child cannot use (an initialised CUDA context), or where fork is absent."""
    return "spawn" if needs_spawn or "fork" not in get_all_start_methods() else "fork"


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the process that started it dies. Without it a pool
    worker whose parent was killed with SIGKILL waits on its task queue forever (it holds a copy of the
    queue's pipe, so it never sees the end of it), and keeps whatever the parent's stdout was open."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(initializer: Callable[..., None] | None, *initargs: Any) -> None:
    # the parent owns the signals: a forked worker inherits its SIGTERM handler (which raises and prints a
    # traceback from the middle of a task); here SIGTERM just ends the worker and Ctrl-C, which the
    # terminal sends to the whole group, is left to the parent, which stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if initializer is not None:
        initializer(*initargs)


def map_ordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    num_workers: Optional[int] = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    method: str | None = None,
    desc: str | None = None,
    unit: str = "item",
) -> list[R]:
    """``[fn(item) for item in items]``, computed by ``num_workers`` processes (0/None: one per core).

    ``initializer(*initargs)`` runs once per worker before its first item (in this process when one worker
    does the work): the place to build per-worker state such as a simulator and a policy, so that ``fn``
    and each item stay small. ``fn``, ``initializer`` and the arguments must be picklable under spawn;
    ``method`` is the multiprocessing start method (default :func:`start_method`).
    """
    workers = min(resolve_workers(num_workers), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=None if desc else True)
    try:
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
            out = []
            for item in items:
                out.append(fn(item))
                bar.update(1)
                raise_if_signalled()  # a SIGTERM whose exception a C callback swallowed stops here
            return out
        ctx = get_context(method or start_method())
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(initializer, *initargs))
        try:
            futures = [pool.submit(fn, item) for item in items]
            out = []
            for fut in futures:  # by index: the merge order is the item order
                out.append(fut.result())
                bar.update(1)
                raise_if_signalled()
        except Exception:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure stops the work not yet started
            raise
        except BaseException:
            # SIGTERM (Terminated) or Ctrl-C, wherever it lands (while submitting too): stop the workers
            # now, not after their running items; waiting on a worker would also wait on one that hangs
            workers_alive = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers_alive:
                proc.terminate()
            raise
        pool.shutdown(wait=True)
        return out
    finally:
        bar.close()
