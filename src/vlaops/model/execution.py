"""How a stream of predicted action chunks becomes one action per control step: ``first``, ``chunk`` or
``ensemble``.

The policy predicts C = ``model.fwd_pred_next_n`` actions at every frame it is asked about. What runs:

- ``first``: a chunk every step, its first action (RoboVLMs' CALVIN evaluation; the runtime's default).
- ``chunk``: a chunk every k = ``chunk_steps`` steps (1..C; None: all C), its k actions run in order,
  open loop (ACT without temporal aggregation: ``query_frequency`` = chunk size).
- ``ensemble``: a chunk every step; the action run at step t is the weighted mean of every prediction made
  for t, by the chunks predicted at t, t-1, ..., t-C+1 (ACT's temporal ensembling, tonyzhaozh/act
  imitate_episodes.py and Algorithm 2 of arXiv:2304.13705). ACT's weights, followed here exactly:
  w_i = exp(-m * i) over the predictions for t in the order they were made, i = 0 the OLDEST, normalised
  to sum 1; m = ``ensemble_coeff`` >= 0 (ACT uses 0.01). Normalised, this is w proportional to exp(+m * a)
  in a prediction's age a (0 for the chunk predicted now): m = 0 is the plain mean, and a larger m leans
  on the older predictions (towards running the oldest chunk open loop), never on the newest (whose
  limit is ``first``). The discrete last dim is ensembled as what the head outputs, the gripper's
  probability (or a mobile base's class probabilities), and the runtime then decides on the mean exactly
  as it decides on one prediction: probability > the normaliser's ``gripper_threshold`` -> +1, else -1
  (the class of highest mean probability).

A row of a chunk is everything the runtime decides an action from: (A-1) arm values in [-1, 1] and the
discrete head's probabilities (1 for a gripper, K for a class head). The executor only moves rows; the
runtime (``vlaops.model.runtime.PolicyRuntime``) predicts the chunks and turns the rows into actions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

EXECUTE_MODES = ("first", "chunk", "ensemble")
ACT_ENSEMBLE_COEFF = 0.01  # ACT's m (imitate_episodes.py: k = 0.01)


@dataclass(frozen=True)
class Execution:
    """The three settings, as ``eval.*`` and ``serve.*`` spell them (``key_prefix`` names their home in
    every message: ``eval.``, ``serve.``, ``params.`` for an MLflow predict call)."""

    mode: str = "first"
    chunk_steps: int | None = None  # chunk: actions run per prediction, 1..C; None: the whole chunk
    ensemble_coeff: float = ACT_ENSEMBLE_COEFF  # ensemble: m of w_i = exp(-m * i), i = 0 the oldest
    key_prefix: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        p = self.key_prefix
        if self.mode not in EXECUTE_MODES:
            raise ValueError(f"{p}execute must be one of {', '.join(EXECUTE_MODES)}, got {self.mode!r}")
        if self.chunk_steps is not None and (isinstance(self.chunk_steps, bool) or self.chunk_steps < 1):
            raise ValueError(
                f"{p}chunk_steps must be an integer >= 1 (at most the policy's model.fwd_pred_next_n) or null "
                f"(the whole chunk), got {self.chunk_steps!r}"
            )
        if not np.isfinite(self.ensemble_coeff) or self.ensemble_coeff < 0:
            raise ValueError(
                f"{p}ensemble_coeff must be a finite number >= 0 (m of ACT's weights exp(-m * i), i = 0 the "
                f"oldest prediction), got {self.ensemble_coeff!r}"
            )

    def steps(self, chunk_size: int) -> int:
        """The actions run per prediction for a policy predicting ``chunk_size``: k for ``chunk``, else 1;
        a k larger than the chunk is a ValueError naming the key."""
        if self.mode != "chunk":
            return 1
        if self.chunk_steps is None:
            return chunk_size
        if self.chunk_steps > chunk_size:
            raise ValueError(
                f"{self.key_prefix}chunk_steps must be in 1..{chunk_size} (the policy predicts "
                f"model.fwd_pred_next_n={chunk_size} actions per chunk), got {self.chunk_steps}"
            )
        return self.chunk_steps

    def describe(self, chunk_size: int) -> dict[str, str | int | float | None]:
        """What metrics.json, MLflow and /health record: the mode, the actions run per prediction (k
        resolved; 1 for first and ensemble) and m (None unless ensemble: no weights were used)."""
        coeff = self.ensemble_coeff if self.mode == "ensemble" else None
        return {"mode": self.mode, "chunk_steps": self.steps(chunk_size), "ensemble_coeff": coeff}


class ChunkExecutor:
    """Predicted chunks in, one row per control step out, as ``execution`` says; ``reset()`` forgets every
    chunk (a new episode, subtask or instruction).

    Each step: if ``needs_chunk()``, predict the chunk at this step's frame and pass it to ``step``;
    otherwise pass None (``chunk`` mode between its predictions).
    """

    def __init__(self, execution: Execution, chunk_size: int) -> None:
        self.execution, self.chunk_size = execution, chunk_size
        self.k = execution.steps(chunk_size)  # ValueError naming the key when k > chunk_size
        self._queue: deque[np.ndarray] = deque()  # chunk: the rows still to run, each (D,)
        self._chunks: deque[np.ndarray] = deque(maxlen=chunk_size)  # ensemble: the last C chunks, oldest first

    def reset(self) -> None:
        self._queue.clear()
        self._chunks.clear()

    def needs_chunk(self) -> bool:
        """Whether this step's action needs a chunk predicted now: always, except in ``chunk`` mode while
        rows of the last chunk are left."""
        return self.execution.mode != "chunk" or not self._queue

    def step(self, chunk: np.ndarray | None) -> np.ndarray:
        """``chunk`` (C, D) predicted at this step, or None when ``needs_chunk()`` said no -> the (D,) row to
        run now (the chunk's own dtype for ``first`` and ``chunk``, float64 for ``ensemble``)."""
        if (chunk is None) == self.needs_chunk():
            raise ValueError("ChunkExecutor.step: pass a chunk exactly when needs_chunk() is True")
        mode = self.execution.mode
        if chunk is not None:
            chunk = np.asarray(chunk)
            if chunk.ndim != 2 or chunk.shape[0] != self.chunk_size:
                raise ValueError(f"ChunkExecutor.step: expected a ({self.chunk_size}, D) chunk, got {chunk.shape}")
        if mode == "first":
            return chunk[0]
        if mode == "chunk":
            if chunk is not None:
                self._queue.extend(chunk[: self.k])
            return self._queue.popleft()
        self._chunks.append(chunk)
        n = len(self._chunks)
        # the predictions for this step, oldest first: the chunk made j steps after the oldest is n-1-j old
        preds = np.stack([c[n - 1 - j] for j, c in enumerate(self._chunks)]).astype(np.float64)  # (n, D)
        w = np.exp(-self.execution.ensemble_coeff * np.arange(n, dtype=np.float64))  # (n,): w_0 for the oldest (ACT)
        return (w / w.sum()) @ preds  # (D,)
