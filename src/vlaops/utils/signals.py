"""SIGTERM and SIGINT as exceptions, raised where Python can unwind them.

``vlaops.cli`` turns SIGTERM into :class:`~vlaops.errors.Terminated` and SIGINT into Python's own
KeyboardInterrupt, so temporaries are removed and the MLflow run ends KILLED. A handler that fires while
C code is calling back into Python (h5py writing through a Python file object, a ``__del__``) cannot
unwind: its exception is printed as "ignored" and the work goes on, or the library is left in a state that
crashes at exit. Two remedies: sections that write through such callbacks defer the signals
(:func:`signals_deferred`), and the long loops re-raise a swallowed one between items
(:func:`raise_if_signalled`). A library's own cleanup can also replace the signal's exception with one of
its own (OmegaConf restoring its flags over a half-built node raises AttributeError): whoever reports how
a run ended asks :func:`signal_behind`, which sees the signal under such an exception.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from vlaops.errors import Terminated

_pending: int | None = None


def signal_arrived(signum: int) -> None:
    """The SIGTERM and SIGINT handlers' body: remember the signal, raise Terminated or KeyboardInterrupt."""
    global _pending
    _pending = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def signal_behind(exc: BaseException) -> int | None:
    """The signal that ended the work with ``exc``, or None if it ended by an error of its own.

    After a signal, any exception is taken as its unwinding: a library's cleanup may have raised over it."""
    if isinstance(exc, Terminated):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    return _pending


def raise_if_signalled() -> None:
    """Raise again a signal that arrived but whose exception was swallowed on the way."""
    if _pending is not None:
        signal_arrived(_pending)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT for the block and raise them after it, outside the library's callbacks.

    Only the main thread can install handlers (and only it runs them); elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if arrived:  # the first one, as if it had come just now
            signal_arrived(arrived[0])
