"""The server's sessions: one policy window per session id, bounded in number and in idle time.

A session is one robot's episode history (``PolicyRuntime``'s window of frame features). The store keeps
them least recently used first; creating one past ``max_sessions`` drops the least recently used, and
any session idle for ``idle_s`` is dropped at the next access, so memory stays bounded whatever the
clients do. A dropped id is remembered (the last ``FORGET_AFTER`` of them) to say why it is unknown.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlaops.eval.env import StepPolicy
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

FORGET_AFTER = 1024  # dropped ids remembered for the 404 message


class UnknownSession(KeyError):
    """No live session has this id; ``reason`` says whether it never existed, was closed or was dropped."""

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(session_id)
        self.session_id, self.reason = session_id, reason

    def __str__(self) -> str:
        return f"session {self.session_id!r} is unknown: {self.reason}"


@dataclass
class Session:
    id: str
    policy: StepPolicy  # this session's own window; the model weights are shared
    last_used: float
    steps: int = 0  # steps since the last reset


class SessionStore:
    """Sessions by id; thread-safe (one lock around the table, held only for bookkeeping)."""

    def __init__(
        self,
        make_policy: Callable[[], StepPolicy],
        max_sessions: int,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.make_policy, self.max_sessions, self.idle_s, self.clock = make_policy, max_sessions, idle_s, clock
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why it was dropped
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def _drop(self, session_id: str, reason: str) -> None:
        self._live.pop(session_id, None)
        self._gone[session_id] = reason
        while len(self._gone) > FORGET_AFTER:
            self._gone.popitem(last=False)

    def _expire(self, now: float) -> None:
        for sid, session in list(self._live.items()):  # oldest first: stop at the first fresh one
            if now - session.last_used <= self.idle_s:
                break
            self._drop(
                sid, f"dropped after {now - session.last_used:.0f} s idle (serve.session_idle_s={self.idle_s:g})"
            )
            log.info("session %s dropped: idle", sid)

    def create(self) -> Session:
        now = self.clock()
        session = Session(id=uuid.uuid4().hex, policy=self.make_policy(), last_used=now)
        with self._lock:
            self._expire(now)
            while len(self._live) >= self.max_sessions:
                oldest = next(iter(self._live))
                self._drop(oldest, f"dropped as the least recently used of serve.max_sessions={self.max_sessions}")
                log.warning("session %s dropped: %d sessions open (serve.max_sessions)", oldest, self.max_sessions)
            self._live[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The live session ``session_id``, now its most recently used; UnknownSession if there is none."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            session = self._live.get(session_id)
            if session is None:
                raise UnknownSession(
                    session_id, self._gone.get(session_id, "never created (POST /sessions creates one)")
                )
            session.last_used = now
            self._live.move_to_end(session_id)
            return session

    def close(self, session_id: str) -> None:
        with self._lock:
            if session_id not in self._live:
                raise UnknownSession(session_id, self._gone.get(session_id, "never created"))
            self._drop(session_id, "closed (DELETE)")

    def summary(self) -> dict[str, Any]:
        with self._lock:
            self._expire(self.clock())
            return {"sessions": len(self._live), "max_sessions": self.max_sessions, "session_idle_s": self.idle_s}
