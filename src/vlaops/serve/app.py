"""``vlaops serve``: the exported policy behind HTTP (FastAPI + uvicorn), one window per session.

    GET    /health                  the loaded policy's facts and the session count
    POST   /sessions                -> 201 {"session_id": "..."}: a new episode history
    POST   /sessions/{id}/step      {"instruction", "rgb_static", "rgb_gripper", "reset"} -> {"action": [7 floats], ...}
    POST   /sessions/{id}/reset     forget the session's window (a new episode or subtask)
    DELETE /sessions/{id}           close the session

Images travel as ``vlaops.serve.codec`` objects (raw pixels or PNG, both exact), at CALVIN's sizes, the
sizes every vlaops policy is trained on (``data/convert.py`` resizes to them): rgb_static 200x200x3,
rgb_gripper 84x84x3 (required when the policy uses the gripper camera). The action is ``PolicyRuntime.step``'s:
relative, in CALVIN units, gripper +-1; JSON carries each float64 exactly (shortest round-trip repr). Which
action of the predicted chunks a step answers is ``serve.execute`` (first | chunk | ensemble, as
``eval.execute``); each session keeps its own chunks, and a reset forgets them with the window.

A bad request is answered 4xx with ``{"error": "<field>: <what is wrong>", "field": "<field>"}`` and
changes nothing: malformed JSON 400, a missing or malformed field or a wrong image size 422, an unknown
session 404. Other sessions go on being served.

Concurrency: uvicorn runs one process; FastAPI runs each request in its thread pool, and one inference
lock lets one step run at a time, whatever its session. A step is compute-bound and already uses every
intra-op thread (or the GPU), so two at once would gain nothing, and the shared tokenizer needs it:
transformers resets the Rust tokenizer's truncation and padding on every call, and a second thread doing
so mid-encode raises "RuntimeError: Already borrowed" (huggingface/tokenizers#537). Each session's window
is its own ``PolicyRuntime`` over the shared weights, so sessions cannot see each other's frames.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from vlaops.errors import Terminated, VlaopsError
from vlaops.io.calvin_spec import RGB_GRIPPER_SIZE, RGB_STATIC_SIZE
from vlaops.serve.codec import decode_image
from vlaops.serve.config import ServeConfig
from vlaops.serve.sessions import SessionStore, UnknownSession
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

# what ``PolicyRuntime.step`` returns, as /health states it
ARM_ACTION = "(7,) relative, CALVIN units: xyz x 0.02 m, euler xyz x 0.05 rad, gripper 1 open / -1 close"
MOBILE_BASE_ACTION = "(4,) linear_x m/s, linear_y m/s, angular_z rad/s, action_type class id"
CAMERA_SHAPES = {
    "rgb_static": (RGB_STATIC_SIZE, RGB_STATIC_SIZE, 3),
    "rgb_gripper": (RGB_GRIPPER_SIZE, RGB_GRIPPER_SIZE, 3),
}


class ImagePayload(BaseModel):
    """One camera frame (``vlaops.serve.codec``); decoded while the request is validated."""

    model_config = ConfigDict(extra="forbid")
    encoding: Literal["raw", "png"] = "raw"
    shape: list[int] | None = None
    data: str
    _pixels: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _decode(self) -> ImagePayload:
        self._pixels = decode_image({"encoding": self.encoding, "shape": self.shape, "data": self.data})
        return self

    @property
    def pixels(self) -> np.ndarray:  # (H, W, 3) uint8
        return self._pixels


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt camera name is named, not ignored
    instruction: str = Field(min_length=1)
    rgb_static: ImagePayload
    rgb_gripper: ImagePayload | None = None  # required when the policy uses the gripper camera
    reset: bool = False  # forget the window first: the first step of an episode


class BadRequest(Exception):
    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)  # names the field itself
        self.status, self.field = status, field


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field})


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors as one line naming the field(s); malformed JSON is a 400."""
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            where = err.get("ctx", {}).get("error", "")
            return _error(400, "body", f"body: not valid JSON ({where or err.get('msg')})")
    parts, fields = [], []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        fields.append(field)
        parts.append(f"{field}: {msg}")
    return _error(422, fields[0] if fields else "body", "; ".join(parts))


class PolicyServer:
    """The shared policy and the sessions; what the HTTP endpoints call (testable without HTTP)."""

    def __init__(
        self,
        runtime: Any,
        cfg: ServeConfig,
        model_dir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime, self.cfg, self.model_dir = runtime, cfg, model_dir
        self.execution = cfg.execution()
        try:  # serve.chunk_steps past the policy's chunk: one line, before a session exists
            self.executed = self.execution.describe(runtime.cfg.fwd_pred_next_n)
        except ValueError as exc:
            raise VlaopsError(str(exc)) from None
        # each session: its own window and chunks over the shared model, processor and normaliser
        self.sessions = SessionStore(
            lambda: runtime.with_execution(self.execution),
            cfg.max_sessions,
            cfg.session_idle_s,
            clock,
        )
        self.cameras = {k: v for k, v in CAMERA_SHAPES.items() if k == "rgb_static" or runtime.cfg.use_hand_rgb}
        self._inference = threading.Lock()

    def facts(self) -> dict[str, Any]:
        from vlaops.model.runtime import FORMAT_VERSION
        from vlaops.tracking import policy_run_id

        m = self.runtime.cfg
        run_id = policy_run_id(self.model_dir) if self.model_dir else None
        return {
            "status": "ok",
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "format_version": FORMAT_VERSION,
            "mlflow_run_id": run_id,
            "device": str(self.runtime.device),
            "backbone": m.backbone,
            "window_size": m.window_size,
            "fwd_pred_next_n": m.fwd_pred_next_n,
            "action_dim": m.action_dim,
            "image_size": m.image_size,
            "use_hand_rgb": m.use_hand_rgb,
            "pad_history": m.pad_history,
            "execute": self.executed,  # which predicted action each step answers (serve.execute)
            "cameras": {k: list(v) for k, v in self.cameras.items()},
            "action": (MOBILE_BASE_ACTION if getattr(m, "action_classes", 0) else ARM_ACTION),
            **self.sessions.summary(),
        }

    def observation(self, request: StepRequest) -> dict[str, np.ndarray]:
        obs = {}
        for key, shape in self.cameras.items():
            image = getattr(request, key)
            if image is None:
                raise BadRequest(
                    422, key, f"{key}: missing; this policy reads it (model.use_hand_rgb), a {list(shape)} uint8 image"
                )
            if image.pixels.shape != shape:
                raise BadRequest(
                    422,
                    key,
                    f"{key}: expected shape {list(shape)} (CALVIN's {key}, what the policy "
                    f"was trained on), got {list(image.pixels.shape)}",
                )
            obs[key] = image.pixels
        return obs

    def step(self, session_id: str, request: StepRequest) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        obs = self.observation(request)
        with self._inference:
            if request.reset:
                session.policy.reset()
                session.steps = 0
            try:
                action = session.policy.step(obs, request.instruction)  # (7,) float64
            except VlaopsError as exc:
                raise BadRequest(422, "observation", f"observation: {exc}") from None
            session.steps += 1
        return {"session_id": session.id, "step": session.steps, "action": action.tolist()}

    def reset(self, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        with self._inference:
            session.policy.reset()
            session.steps = 0
        return {"session_id": session.id, "step": 0}


def create_app(server: PolicyServer) -> FastAPI:
    app = FastAPI(title="vlaops policy server", version="1", summary="observation -> next action, per session")
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(exc.status, exc.field, str(exc))

    @app.exception_handler(UnknownSession)
    async def _unknown(request: Request, exc: UnknownSession) -> JSONResponse:
        return _error(404, "session_id", str(exc))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return server.facts()

    @app.post("/sessions", status_code=201)
    def create_session() -> dict[str, Any]:
        return {"session_id": server.sessions.create().id}

    @app.post("/sessions/{session_id}/step")
    def step(session_id: str, request: StepRequest) -> dict[str, Any]:
        return server.step(session_id, request)

    @app.post("/sessions/{session_id}/reset")
    def reset(session_id: str) -> dict[str, Any]:
        return server.reset(session_id)

    @app.delete("/sessions/{session_id}")
    def close(session_id: str) -> dict[str, Any]:
        server.sessions.close(session_id)
        return {"session_id": session_id, "closed": True}

    return app


def _uvicorn_config(app: FastAPI, cfg: ServeConfig, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port, timeout_keep_alive=int(cfg.keep_alive_s), log_level=log_level, lifespan="off"
    )


@contextlib.contextmanager
def running_server(app: FastAPI, cfg: ServeConfig | None = None, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` from a thread of this process (tests, bench/serve_latency.py); yields its base URL.

    ``cfg.port`` 0 picks a free port: the socket is bound here, before uvicorn starts, so the URL is
    known and no other process can take the port in between."""
    import uvicorn

    cfg = cfg or ServeConfig(port=0)
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections accepted from such a
    # socket, and without it each response (headers, then body: two writes) waits 40 ms for a delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    server = uvicorn.Server(_uvicorn_config(app, cfg, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlaops-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise VlaopsError(
                    f"the policy server on {cfg.host}:{sock.getsockname()[1]} did not start (see its log)"
                )
            time.sleep(0.01)
        yield f"http://{cfg.host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def serve(model_dir: str | Path, cfg: ServeConfig) -> None:
    """Load the export at ``model_dir`` (a bad one fails here, before the port is opened) and serve it
    until SIGINT/SIGTERM (uvicorn finishes the requests in flight; then ``vlaops serve`` exits 0)."""
    import uvicorn

    from vlaops.model import PolicyRuntime
    from vlaops.utils.device import resolve_device  # torch: imported where a policy is loaded

    runtime = PolicyRuntime.load(Path(model_dir), resolve_device(cfg.device, "serve.device"), cfg.execution())
    server = PolicyServer(runtime, cfg, model_dir)
    log.info(
        "serving %s on http://%s:%d (%s, execute %s; at most %d sessions, dropped after %g s idle)",
        model_dir,
        cfg.host,
        cfg.port,
        runtime.device,
        server.executed,
        cfg.max_sessions,
        cfg.session_idle_s,
    )
    try:
        uvicorn.Server(_uvicorn_config(create_app(server), cfg, "info")).run()
    except (KeyboardInterrupt, Terminated):
        pass  # uvicorn finished the requests in flight, then re-raised the signal it caught: a server's normal stop
    log.info("stopped serving %s", model_dir)
