"""Ablations: the same chains with one input of the policy taken away, to show what it relies on.

A policy that looks at the cameras must fall when they go black; one that listens must fall when it is
given another task's instruction. Each ablation is a wrapper with the policy's own ``reset()`` /
``step(obs, instruction)`` interface, so it applies to any ``StepPolicy`` (the trained runtime, a
reference, a robot-side adapter), and it changes exactly one thing: the images, or the instruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vlaops.errors import VlaopsError
from vlaops.eval.config import ABLATIONS
from vlaops.eval.env import StepPolicy

# Camera keys of an observation, flat (TabletopEnv) or under "rgb_obs" (CALVIN's env).
IMAGE_KEYS = ("rgb_static", "rgb_gripper")
# Ablations under which no policy sees a rendered image: the simulator can skip rendering.
NEEDS_NO_IMAGES = ("blank_images",)


def blank_images(obs: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``obs`` with every camera image replaced by zeros of the same shape and dtype."""
    out = dict(obs)
    for key in IMAGE_KEYS:
        if key in out:
            out[key] = np.zeros_like(np.asarray(out[key]))  # (H, W, 3) u8 of zeros
    nested = out.get("rgb_obs")
    if isinstance(nested, Mapping):
        out["rgb_obs"] = {k: np.zeros_like(np.asarray(v)) if k in IMAGE_KEYS else v for k, v in nested.items()}
    return out


def swap_map(instructions: Mapping[str, str]) -> dict[str, str]:
    """{instruction: another task's instruction}, from {task name: instruction} of the evaluated tasks.

    Each task gets the instruction of the next task in sorted name order (the last gets the first's): a
    fixed cyclic permutation, so the swap is deterministic, never the task's own, and every instruction
    is still used once. Tasks that share an instruction cannot be told apart by it: an error.
    """
    names = sorted(instructions)
    if len(names) < 2:
        raise VlaopsError(f"eval.ablations=swap_instruction needs at least 2 evaluated tasks, got {names}")
    if len(set(instructions.values())) != len(names):
        raise VlaopsError(f"eval.ablations=swap_instruction: tasks {names} do not have distinct instructions")
    return {instructions[a]: instructions[b] for a, b in zip(names, names[1:] + names[:1], strict=True)}


class AblatedPolicy:
    """``policy`` seen through one ablation: ``blank_images`` or ``swap_instruction``."""

    def __init__(self, policy: StepPolicy, mode: str, instructions: Mapping[str, str] | None = None) -> None:
        """``instructions`` ({task name: instruction} of the evaluated tasks) is needed by swap_instruction."""
        if mode not in ABLATIONS:
            raise VlaopsError(f"eval.ablations: unknown value {mode!r}; allowed: {', '.join(ABLATIONS)}")
        self.policy = policy
        self.mode = mode
        self.swap = swap_map(instructions or {}) if mode == "swap_instruction" else {}

    def reset(self) -> None:
        self.policy.reset()

    def transform(self, obs: dict[str, Any], instruction: str) -> tuple[dict[str, Any], str]:
        """The (observation, instruction) the wrapped policy is given instead of (obs, instruction)."""
        if self.mode == "blank_images":
            return blank_images(obs), instruction
        try:
            return obs, self.swap[instruction]
        except KeyError:
            raise VlaopsError(
                f"swap_instruction: {instruction!r} is not the instruction of an evaluated task ({sorted(self.swap)})"
            ) from None

    def step(self, obs: dict[str, Any], instruction: str) -> np.ndarray:
        return self.policy.step(*self.transform(obs, instruction))
