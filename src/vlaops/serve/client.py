"""``PolicyClient``: a policy served by ``vlaops serve``, behind ``PolicyRuntime``'s interface.

    client = PolicyClient("http://127.0.0.1:8000")
    client.reset()                                   # a new episode: the next step starts a fresh window
    action = client.step(obs, "lift the blue block") # (7,) float64, equal to PolicyRuntime.step's
    client.close()                                   # or use it as a context manager

So the evaluation harness (``vlaops.eval.chains``), the ROS2 example and a robot's own loop drive a served
policy as they drive an in-process one. Standard library only (``http.client``, one kept-alive
connection), so a robot computer needs nothing but numpy and Pillow besides it.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from vlaops.errors import VlaopsError
from vlaops.serve.codec import encode_image

CAMERAS = ("rgb_static", "rgb_gripper")


class ServeError(VlaopsError):
    """The server refused a request (4xx: the message names the field) or failed (5xx)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.field = status, field


def _camera(obs: dict[str, Any], key: str) -> np.ndarray | None:
    """obs["rgb_static"] or CALVIN's obs["rgb_obs"]["rgb_static"], as PolicyRuntime reads them."""
    if key in obs:
        return obs[key]
    nested = obs.get("rgb_obs")
    return nested.get(key) if isinstance(nested, dict) else None


class PolicyClient:
    """One session on a policy server; ``reset`` / ``step`` as ``PolicyRuntime``.

    ``encoding``: "raw" (no encoding cost, larger) or "png" (smaller; both exact). ``timeout`` in seconds
    per request. The connection is re-opened when it has been idle longer than ``reconnect_after_s``
    (below the server's ``serve.keep_alive_s``), so a step is never sent on a connection the server has
    just closed; a failed step is not retried (it might have been applied).
    """

    def __init__(self, url: str, encoding: str = "raw", timeout: float = 30.0, reconnect_after_s: float = 2.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise VlaopsError(f"policy server URL must look like http://host:port, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.encoding, self.timeout, self.reconnect_after_s = encoding, timeout, reconnect_after_s
        self.session_id: str | None = None
        self._reset_next = True
        self._conn: http.client.HTTPConnection | None = None
        self._last_used = 0.0

    # --- transport ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request -> the decoded JSON answer; ServeError on a 4xx/5xx, naming the server's field."""
        if self._conn is None or time.monotonic() - self._last_used > self.reconnect_after_s:
            self._disconnect()
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.connect()
            except OSError as exc:
                self._disconnect()
                raise VlaopsError(f"policy server http://{self.host}:{self.port}: cannot connect ({exc})") from exc
            # http.client sends the headers and the body in two writes: with Nagle's algorithm on, the body
            # waits for the server's delayed ACK of the headers (40 ms on Linux) on every request
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            self._conn.request(method, path, body=payload, headers=headers)
            response = self._conn.getresponse()
            text = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._disconnect()
            raise VlaopsError(
                f"policy server http://{self.host}:{self.port}{path}: {type(exc).__name__}: {exc}"
            ) from exc
        self._last_used = time.monotonic()
        try:
            answer = json.loads(text) if text else None
        except json.JSONDecodeError:
            answer = {"error": text.decode(errors="replace")[:200]}
        if response.status >= 400:
            answer = answer if isinstance(answer, dict) else {}
            raise ServeError(
                response.status,
                str(answer.get("error") or answer.get("detail") or response.reason),
                answer.get("field"),
            )
        return answer

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- PolicyRuntime's interface -----------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def open(self) -> str:
        """Create this client's session (``step`` does it when needed); returns its id."""
        self.session_id = self.request("POST", "/sessions")["session_id"]
        self._reset_next = False  # a new session has an empty window
        return self.session_id

    def reset(self) -> None:
        """Start a new episode: the next step carries ``reset``, so it costs no request of its own."""
        self._reset_next = True

    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray:
        """obs with ``rgb_static`` (and ``rgb_gripper`` when the policy uses it), (H, W, 3) uint8, flat or
        under ``rgb_obs`` -> the (7,) float64 relative action."""
        if self.session_id is None:
            self.open()
        body: dict[str, Any] = {"instruction": instruction, "reset": self._reset_next}
        for key in CAMERAS:
            img = _camera(obs, key)
            if img is not None:
                body[key] = encode_image(img, self.encoding)
        answer = self.request("POST", f"/sessions/{self.session_id}/step", body)
        self._reset_next = False
        return np.asarray(answer["action"], dtype=np.float64)

    def close(self) -> None:
        """Close the session on the server (if any) and the connection."""
        try:
            if self.session_id is not None:
                self.request("DELETE", f"/sessions/{self.session_id}")
        except ServeError as exc:
            if exc.status != 404:  # already dropped (idle, LRU): nothing left to close
                raise
        finally:
            self.session_id = None
            self._disconnect()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
