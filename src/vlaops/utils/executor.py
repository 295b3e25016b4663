"""The executor seam for embarrassingly parallel work (the ``compute`` config group).

``map_ordered(fn, items, num_workers, ...)`` returns ``[fn(item) for item in items]`` whatever runs it:
items are handed out by index and the results merged by index, so an output never depends on the
executor, on how many workers computed it or in which order they finished. ``compute.executor`` picks
where the workers run:

- ``local`` (the default; no Ray is imported): one worker runs in this process (no pickling, plain
  tracebacks); more are processes of this machine, each fed one item at a time over its own pipe.
- ``ray``: the same workers as Ray actors (``compute.ray_address``: null starts or finds a local instance,
  ``auto`` the cluster ``ray start`` runs on this machine, ``ray://host:10001`` a remote one through Ray
  Client). Ray is an optional extra (``pip install vlaops[ray]``), imported only here.

Either way a worker runs ``initializer(*initargs)`` once, before its first item: the simulator and the
policy travel to a worker once, not with each task. Progress counts finished tasks across workers. A
worker that dies (a killed process, the OOM killer) has its task run again on a fresh worker, up to
``compute.max_retries`` times; then the stage stops with :class:`TaskFailed`, one line naming the task.
An exception raised by ``fn`` is not retried (the code is deterministic: it would raise again): the
lowest-index one is re-raised as it was, with the worker's traceback as its cause and a note naming the task.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from vlaops.errors import VlaopsError
from vlaops.utils.logging import get_logger
from vlaops.utils.signals import raise_if_signalled, signals_deferred

log = get_logger(__name__)
T = TypeVar("T")
R = TypeVar("R")
EXECUTORS = ("local", "ray")
RAY_EXTRA = "pip install vlaops[ray]"


@dataclass
class ComputeConfig:
    """Where the parallel stages' tasks run (collect's tasks, ingest's recordings, evaluate's chains).

    Not a DVC param of any stage: it decides where the work runs, not what it computes (the outputs are
    the same bytes for every executor and number of workers; tests/test_executor.py). How many workers
    stays each stage's own setting (``sim.num_workers``, ``data.num_workers``, ``eval.num_workers``;
    for the last two 0: one per CPU core, of this machine or, under Ray, of the cluster)."""

    executor: str = "local"  # local: processes of this machine; ray: Ray actors
    ray_address: str | None = (
        # null: Ray's default (the cluster on this machine, else a new local instance); auto; ray://host:10001;
        # host:6379
        None
    )
    max_retries: int = 1  # a task whose worker died runs again this many times, then the stage fails naming it
    ray_connect_timeout_s: float = 15.0  # how long connecting to compute.ray_address may take before the stage fails

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"compute.executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        address = self.ray_address
        if address is not None and address != "auto" and not re.fullmatch(r"(ray://)?[^\s:/]+:\d+", address):
            raise ValueError(
                f"compute.ray_address must be null (a local Ray instance), 'auto' (the cluster 'ray start' "
                f"runs on this machine), 'ray://host:10001' (Ray Client) or 'host:6379', got {address!r}"
            )
        if self.max_retries < 0:
            raise ValueError(f"compute.max_retries must be >= 0, got {self.max_retries!r}")
        if self.ray_connect_timeout_s <= 0:
            raise ValueError(f"compute.ray_connect_timeout_s must be > 0, got {self.ray_connect_timeout_s!r}")


class TaskFailed(VlaopsError):
    """A task whose worker died more than ``compute.max_retries`` times (the CLI prints it as one line)."""


def resolve_workers(num_workers: int | None, compute: ComputeConfig | None = None) -> int:
    """0 or None: one worker per CPU core this process may use (under ``compute.executor=ray``: one per CPU
    of the cluster)."""
    if num_workers:
        return int(num_workers)
    if compute is not None and compute.executor == "ray":
        connect(compute)
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return usable_cpus()


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (``cpu_max``; a
    container limited to 2 cores of a 64-core host sees 64 in os.cpu_count())."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


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


_HELD = {signal.SIGTERM, signal.SIGINT}


def _init_worker(initializer: Callable[..., None] | None, *initargs: Any) -> None:
    # the parent owns the signals: a forked worker inherits its SIGTERM handler (which raises and prints a
    # traceback from the middle of a task); here SIGTERM just ends the worker and Ctrl-C, which the
    # terminal sends to the whole group, is left to the parent, which stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # held by the parent across our start: see start()
    _die_with_parent()
    if initializer is not None:
        initializer(*initargs)


# ---- an exception and its worker's traceback, across a pipe or Ray's object store -------------------
class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (its ``__cause__`` in this process)."""

    def __str__(self) -> str:
        return self.args[0]


def _rebuild(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


class _Raised:
    """What a worker sends back for an exception (as concurrent.futures does): the exception itself, whose
    type callers catch, and its formatted traceback, which does not pickle otherwise."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def __reduce__(self):
        return _rebuild, (self.exc, self.tb)


def _name_task(exc: BaseException, name: str) -> BaseException:
    if hasattr(exc, "add_note"):  # Python 3.11+: the note follows the traceback, the one-line message stays as it was
        exc.add_note(f"(while running {name})")
    return exc


# ---- the local backend: worker processes, one item at a time over a pipe each ------------------------
def _local_worker(
    conn: Any, fn: Callable[[Any], Any], initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    """A local worker's life: initialise, then ``(index, item)`` in, ``(index, ok, result or _Raised)`` out,
    until the parent sends None or goes away."""
    init_error = None
    try:
        _init_worker(initializer, *initargs)
    except BaseException as exc:  # noqa: BLE001 - the answer to every item, as a Ray worker's is
        init_error = _Raised(exc)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, item = message
        try:
            if init_error is not None:
                reply = (index, False, init_error)
            else:
                reply = (index, True, fn(item))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
            reply = (index, False, _Raised(exc))
        _reply(conn, reply)


def _reply(conn: Any, reply: tuple[int, bool, Any]) -> None:
    try:
        conn.send(reply)
    except (EOFError, OSError):
        pass  # the parent is gone
    except Exception as exc:  # noqa: BLE001 - the result (or the exception) does not pickle
        conn.send(
            (
                reply[0],
                False,
                _Raised(RuntimeError(f"the worker's result cannot be sent back: {type(exc).__name__}: {exc}")),
            )
        )


def _exit_cause(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _LocalBackend:
    def __init__(
        self,
        fn: Callable[[Any], Any],
        initializer: Callable[..., None] | None,
        initargs: tuple[Any, ...],
        method: str | None,
    ) -> None:
        self.ctx = get_context(method or start_method())
        self.args = (fn, initializer, initargs)
        self.workers: dict[int, tuple[Any, Any]] = {}  # id -> (process, the parent's end of its pipe)
        self.next_id = 0

    def start(self) -> int:
        parent_end, child_end = self.ctx.Pipe()
        proc = self.ctx.Process(target=_local_worker, args=(child_end, *self.args), daemon=True)
        # A SIGTERM/SIGINT landing between the fork and our books would leave a worker that close() does not
        # know of, running on after our last line: the parent defers the signals' handlers over the start
        # (blocking them is not enough: another thread of ours takes the signal, the main thread runs the
        # handler), and the worker starts with them blocked, taking them once its own handlers are in place
        # (_init_worker), so it never runs ours.
        with signals_deferred():
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
            try:
                proc.start()
                child_end.close()  # the worker holds the only other end: its death reads as end-of-file here
                self.next_id += 1
                self.workers[self.next_id] = (proc, parent_end)
            finally:  # a signal held for this thread meanwhile reaches the deferring handler, not ours
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return self.next_id

    def submit(self, wid: int, index: int, item: Any) -> bool:
        try:
            self.workers[wid][1].send((index, item))
            return True
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return False

    def wait(self, busy: dict[int, int]) -> list[tuple[int, bool | None, Any]]:
        """(worker, True/False, result/_Raised-rebuilt exception) for each finished task; None and the cause
        of death for a worker that died."""
        by_handle = {}
        for wid in busy:
            proc, conn = self.workers[wid]
            by_handle[conn] = by_handle[proc.sentinel] = wid
        events, seen = [], set()
        for handle in wait_ready(list(by_handle)):
            wid = by_handle[handle]
            if wid in seen:
                continue
            seen.add(wid)
            proc, conn = self.workers[wid]
            try:
                if conn.poll():
                    index, ok, payload = conn.recv()
                    events.append((wid, ok, payload))
                    continue
            except (EOFError, OSError):
                pass
            proc.join(5)
            events.append((wid, None, _exit_cause(proc.exitcode)))
        return events

    def discard(self, wid: int) -> None:
        proc, conn = self.workers.pop(wid)
        conn.close()
        if proc.is_alive():
            proc.kill()
        proc.join()

    def close(self, now: bool) -> None:
        """Normally ask each worker to stop and wait; ``now`` (a signal, an error of ours): SIGTERM them
        at once, not after their running items; waiting on a worker would also wait on one that hangs."""
        for proc, conn in self.workers.values():
            if now:
                proc.terminate()
            else:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for wid in list(self.workers):
            proc, conn = self.workers.pop(wid)
            proc.join(30 if now else 120)  # a worker that hangs on its way out is killed, not waited for
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


# ---- the Ray backend: the same workers as actors ----------------------------------------------------
class _RayWorker:
    """A Ray actor holding what ``initializer`` built (kept in its process, as a local worker keeps it)."""

    def __init__(
        self, fn: Callable[[Any], Any], initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
    ) -> None:
        self.fn = fn
        self.init_error: _Raised | None = None
        try:
            if initializer is not None:
                initializer(*initargs)
        except Exception as exc:  # noqa: BLE001 - reported with the first item, as the local backend does
            self.init_error = _Raised(exc)

    def run(self, item: Any) -> tuple[bool, Any]:
        if self.init_error is not None:
            return False, self.init_error
        try:
            return True, self.fn(item)
        except Exception as exc:  # noqa: BLE001 - the exception travels back as itself, not as RayTaskError
            return False, _Raised(exc)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise VlaopsError(
            f"compute.executor=ray, but Ray is not installed; {RAY_EXTRA} (or set compute.executor=local)"
        ) from None
    return ray


def _reachable(address: str, timeout: float) -> None:
    """A host:port address answers a TCP connection within ``timeout`` seconds (ray.init would retry for
    minutes before saying so)."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise VlaopsError(
            f"compute.ray_address={address}: cannot reach {host}:{port} ({exc.strerror or exc}); expected a "
            f"running Ray cluster there ('ray start --head' on that machine), or compute.ray_address=null "
            f"for a local instance"
        ) from None


def connect(compute: ComputeConfig) -> None:
    """Fail fast, before any long work: for ``compute.executor=ray``, Ray importable and the cluster of
    ``compute.ray_address`` joined (once per process; later calls reuse the connection). A stage calls it
    first; :func:`map_ordered` calls it too."""
    if compute.executor != "ray":
        return
    ray = _import_ray()
    if ray.is_initialized():
        return
    address = compute.ray_address
    if address not in (None, "auto"):
        _reachable(address, compute.ray_connect_timeout_s)
    import logging

    started = time.perf_counter()
    try:
        # a new local instance without its dashboard; joining a cluster takes the cluster's own settings
        ray.init(
            address=address, logging_level=logging.WARNING, **({"include_dashboard": False} if address is None else {})
        )
    except ImportError as exc:  # ray://: Ray Client needs grpcio, which plain `pip install ray` lacks
        raise VlaopsError(f"compute.ray_address={address}: Ray Client is not installed ({exc}); {RAY_EXTRA}") from None
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlaopsError(
            f"compute.ray_address={address if address is not None else 'null'}: cannot join a Ray "
            f"cluster ({first}); expected a running cluster ('ray start --head'), or null for a local instance"
        ) from None
    log.info(
        "Ray: joined %s in %.1f s (%s CPUs)",
        address or "a local instance",
        time.perf_counter() - started,
        ray.cluster_resources().get("CPU", 0),
    )


class _RayBackend:
    def __init__(
        self, fn: Callable[[Any], Any], initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
    ) -> None:
        import ray

        self.ray = ray
        # Ray restarts nothing itself: the retry is ours (compute.max_retries), the same as the local backend's.
        # Niceness 0, a local worker's: Ray starts its workers at 15 (RAY_worker_niceness), where, on a node
        # shared with other jobs, they get a sliver of a core (measured on the 2 busy cores here: one collect
        # task took 3.5 s of CPU in 64 s of wall time, 5.4 s in a local worker)
        self.actor_class = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_RayWorker).options(
            runtime_env={"env_vars": {"RAY_worker_niceness": "0"}}
        )
        self.shared = [ray.put(x) for x in (fn, initializer, initargs)]  # into the object store once
        self.workers: dict[int, Any] = {}
        self.running: dict[int, Any] = {}  # worker id -> the object ref of its task
        self.next_id = 0

    def start(self) -> int:
        self.next_id += 1
        self.workers[self.next_id] = self.actor_class.remote(*self.shared)
        return self.next_id

    def submit(self, wid: int, index: int, item: Any) -> bool:
        self.running[wid] = self.workers[wid].run.remote(item)
        return True

    def wait(self, busy: dict[int, int]) -> list[tuple[int, bool | None, Any]]:
        ray = self.ray
        by_ref = {self.running[wid]: wid for wid in busy}
        ready: list[Any] = []
        while not ready:  # in short waits, so that a signal is handled in Python between them
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.5)
        events = []
        for ref in ready:
            wid = by_ref[ref]
            del self.running[wid]
            try:
                ok, payload = ray.get(ref)
                events.append((wid, ok, payload))
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                events.append((wid, None, f"{type(exc).__name__}: {cause}"))
        return events

    def discard(self, wid: int) -> None:
        self.ray.kill(self.workers.pop(wid))

    def close(self, now: bool) -> None:
        for actor in self.workers.values():
            self.ray.kill(actor)  # its resources go back to the cluster for the next stage's actors
        self.workers.clear()


def _schedule(
    backend: Any, items: Sequence[Any], workers: int, max_retries: int, name: Callable[[int], str], bar: tqdm
) -> list[Any]:
    """Keep ``workers`` busy one item at a time; merge by index; retry an item whose worker died."""
    out: list[Any] = [None] * len(items)
    queue = deque(range(len(items)))
    deaths = [0] * len(items)
    failed: dict[int, BaseException] = {}
    idle = [backend.start() for _ in range(workers)]
    busy: dict[int, int] = {}  # worker -> item index
    while (queue and not failed) or busy:
        while idle and queue and not failed:
            wid, index = idle.pop(), queue.popleft()
            busy[wid] = index
            if not backend.submit(wid, index, items[index]):  # it died before the item reached it
                break
        for wid, ok, payload in backend.wait(busy):
            index = busy.pop(wid)
            if ok:
                out[index] = payload
                bar.update(1)
                idle.append(wid)
            elif ok is False:  # fn raised (or the initializer did): no retry, it would raise again
                failed[index] = _name_task(payload, name(index))
                idle.append(wid)
            else:
                backend.discard(wid)
                deaths[index] += 1
                if deaths[index] > max_retries:
                    failed[index] = TaskFailed(
                        f"{name(index)}: its worker died {deaths[index]} times (last: {payload}); "
                        f"not run again (compute.max_retries={max_retries})"
                    )
                else:
                    log.warning(
                        "%s: its worker died (%s); running it again on a new worker (%d of %d retries)",
                        name(index),
                        payload,
                        deaths[index],
                        max_retries,
                    )
                    queue.appendleft(index)
                    idle.append(backend.start())
        raise_if_signalled()  # a SIGTERM whose exception a C callback swallowed stops here
    if failed:  # the first in item order, whichever finished first: the same error for any number of workers
        raise failed[min(failed)]
    return out


def map_ordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    num_workers: int | None = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    method: str | None = None,
    desc: str | None = None,
    unit: str = "item",
    compute: ComputeConfig | None = None,
    label: Callable[[T], str] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]``, computed by ``num_workers`` workers (0/None: one per core).

    ``initializer(*initargs)`` runs once per worker before its first item (in this process when one local
    worker does the work): the place to build per-worker state such as a simulator and a policy, so that
    ``fn`` and each item stay small. ``fn``, ``initializer`` and the arguments must be picklable (under
    spawn, and by Ray); ``method`` is the local start method (default :func:`start_method`). ``compute``
    picks the executor (default: local, one retry); ``label(item)`` names a task in errors and logs
    (default: ``<unit> <index>``).
    """
    compute = compute or ComputeConfig()

    def name(index: int) -> str:
        return f"{desc or 'task'}: {label(items[index]) if label else f'{unit} {index}'}"

    workers = min(resolve_workers(num_workers, compute), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=None if desc else True)
    try:
        if compute.executor == "local" and workers == 1:
            if initializer is not None:
                initializer(*initargs)
            out = []
            for index, item in enumerate(items):
                try:
                    out.append(fn(item))
                except Exception as exc:
                    _name_task(exc, name(index))
                    raise
                bar.update(1)
                raise_if_signalled()  # a SIGTERM whose exception a C callback swallowed stops here
            return out
        backend = (
            _RayBackend(fn, initializer, initargs)
            if compute.executor == "ray"
            else _LocalBackend(fn, initializer, initargs, method)
        )
        try:
            out = _schedule(backend, items, workers, compute.max_retries, name, bar)
        except BaseException:
            # SIGTERM (Terminated), Ctrl-C, or an error: nothing of ours runs on (a task's own error was
            # raised only after the other running items had finished, as before)
            backend.close(now=True)
            raise
        backend.close(now=False)
        return out
    finally:
        bar.close()
