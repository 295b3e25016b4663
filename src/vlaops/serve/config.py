"""Settings of ``vlaops serve``: where the HTTP policy server listens and how many sessions it keeps."""

from __future__ import annotations

from dataclasses import dataclass

from vlaops.model.execution import ACT_ENSEMBLE_COEFF, Execution


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 to accept a robot on the network (no authentication: a trusted network only)
    port: int = 8000
    device: str = "auto"  # auto: cuda when available, else cpu (as eval.device)
    # One window of frame features per session (8 x D floats: 64 KiB at Kosmos-2 size); past max_sessions
    # the least recently used session is dropped, and a session idle for session_idle_s is dropped too,
    # so a robot that never closes its sessions cannot grow the server without bound.
    max_sessions: int = 64
    session_idle_s: float = 600.0
    # uvicorn's keep-alive for idle connections; the client reconnects before this runs out
    keep_alive_s: float = 5.0
    # Which action of the predicted chunks each step answers, as eval.execute (vlaops.model.execution):
    # first | chunk (chunk_steps per prediction; null: the whole chunk) | ensemble (ensemble_coeff: ACT's m)
    execute: str = "first"
    chunk_steps: int | None = None
    ensemble_coeff: float = ACT_ENSEMBLE_COEFF

    def execution(self) -> Execution:
        """The three execution settings as the runtime takes them (messages name ``serve.<key>``)."""
        return Execution(self.execute, self.chunk_steps, self.ensemble_coeff, key_prefix="serve.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port must be in [0, 65535], got {self.port!r}")
        if self.max_sessions < 1:
            raise ValueError(f"serve.max_sessions must be >= 1, got {self.max_sessions!r}")
        for name in ("session_idle_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"serve.{name} must be > 0, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"serve.device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.execution()  # serve.execute, chunk_steps (<= the policy's chunk is checked at load), ensemble_coeff
