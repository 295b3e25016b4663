"""An exponential moving average of the trainable weights (``train.ema_decay``).

Behaviour cloning evaluates in closed loop, where one unlucky last update can move where the arm goes by
centimetres; the average of the last few hundred steps' weights is a smoother policy than the last step's
(Diffusion Policy and ACT-style recipes ship one). With ``ema_decay > 0`` the loop validates and exports
the averaged weights, and checkpoints carry the average (``ema.safetensors``) so a resume continues it
exactly and ``vlaops export`` writes it.

The average is of the parameters that train (the frozen rest is the same in both), kept in fp32 whatever
the training precision. Early steps use a shorter average, ``min(decay, (1 + step) / (10 + step))``, so
the random initial weights do not linger in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from vlaops.errors import VlaopsError
from vlaops.train.trainable import plain_name
from vlaops.utils.atomic import atomic_file

EMA_FILE = "ema.safetensors"  # in a checkpoint: the averaged trainable weights, keys as in the model file


def decay_at(decay: float, step: int) -> float:
    """The averaging weight of the old average at optimizer ``step`` (1-based): short at first."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightEMA:
    """The running average of ``policy``'s trainable parameters (``policy``: the module as built, unwrapped)."""

    def __init__(self, policy: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.params = {plain_name(n): p for n, p in policy.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in, after optimizer step ``step``."""
        weight = 1.0 - decay_at(self.decay, step)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Put the average into the policy's parameters (for good: the end of training)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the policy's parameters for the block (validation), the trained weights after."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def save(self, directory: Path) -> Path:
        """Write ``directory/ema.safetensors`` atomically."""
        path = Path(directory) / EMA_FILE
        with atomic_file(path, "wb") as handle:
            handle.write(save({n: t.contiguous() for n, t in self.shadow.items()}))
        return path

    def load(self, directory: Path) -> None:
        """Continue the average a checkpoint holds; one line if it is not this policy's."""
        state = read_ema(directory)
        if state is None:
            raise VlaopsError(
                f"{directory}: no {EMA_FILE}, but train.ema_decay={self.decay} (the run that wrote it had no "
                f"weight average); resume with train.ema_decay=0, or delete the checkpoint to start afresh"
            )
        path = Path(directory) / EMA_FILE
        if set(state) != set(self.shadow) or any(state[n].shape != self.shadow[n].shape for n in state):
            raise VlaopsError(
                f"{path}: holds {len(state)} tensors, this policy trains {len(self.shadow)} "
                f"(e.g. missing {sorted(set(self.shadow) - set(state))[:2]}); not this recipe's average"
            )
        self.shadow = {n: state[n].float() for n in self.shadow}


def read_ema(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The averaged weights a checkpoint holds, or None (a run without ``train.ema_decay``)."""
    path = Path(checkpoint) / EMA_FILE
    return load_file(str(path)) if path.is_file() else None
