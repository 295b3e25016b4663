"""Closed-loop inference cost: ``PolicyRuntime.step`` with its per-frame feature cache vs re-encoding the window.

The runtime runs the backbone once per control step and keeps earlier frames' features; the baseline
is what a straightforward port of the training forward does at every step: push the whole window (up
to ``model.window_size`` frames, preprocessed once each) through the backbone again in one batched
call, built from the parts of ``PolicyRuntime.encode`` (``images``, ``text``). Re-encoding the window
frame by frame through ``encode`` itself would be a slower, unfair baseline (measured on a 16-core
CPU: 36.6 vs 12.6 ms/step for the tiny default). Both produce the same action (checked here); only
the cost differs, and it grows with the window.

    python bench/policy_step.py                       # the default tiny model on CPU
    python bench/policy_step.py model.window_size=16 --steps 60 --device cuda

Overrides are Hydra overrides of conf/ (the model a run would build). Random weights: the cost does
not depend on them. Prints a table and writes reports/bench/policy_step.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from vlaops.config import load_config
from vlaops.data.normalization import ActionNormalizer
from vlaops.model import PolicyRuntime, VLAPolicy, build_offline_processor
from vlaops.sim.tasks import TASKS, get_task
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]

# random weights: what a step costs does not depend on them, and models/pretrained need not exist
RANDOM_WEIGHTS = ["model.pretrained_dir=null"]


def synthetic_episode(steps: int, static: int, gripper: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "rgb_static": rng.integers(0, 256, (static, static, 3), dtype=np.uint8),
            "rgb_gripper": rng.integers(0, 256, (gripper, gripper, 3), dtype=np.uint8),
        }
        for _ in range(steps)
    ]


class WindowRecompute:
    """The baseline: every step re-encodes every frame in the window, then runs the head."""

    def __init__(self, policy: PolicyRuntime) -> None:
        self.p = policy
        self.frames: deque[tuple[torch.Tensor, torch.Tensor | None]] = deque(maxlen=policy.window_size)

    def reset(self) -> None:
        self.frames.clear()

    @torch.inference_mode()
    def step(self, obs: dict[str, np.ndarray], instruction: str) -> np.ndarray:
        p = self.p
        ids, mask = p.text(instruction)  # (1, L) each
        self.frames.append(p.images(obs))  # (1, 3, S, S), (1, 3, S, S) | None
        rgb = torch.cat([f[0] for f in self.frames])  # (w, 3, S, S)
        hands = torch.cat([f[1] for f in self.frames]) if p.cfg.use_hand_rgb else None
        w = rgb.shape[0]
        feats = p.model.encode_frames(rgb, hands, ids.expand(w, -1), mask.expand(w, -1))  # (w, D): one batched call
        return p.action_from_features(feats[None])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_episodes(
    runner, episodes: list[list[dict]], instruction: str, device: torch.device
) -> tuple[float, list[np.ndarray]]:
    """Mean milliseconds per step over every step of ``episodes`` (reset between them), and the actions."""
    actions, total, count = [], 0.0, 0
    for episode in episodes:
        runner.reset()
        for obs in episode:
            sync(device)
            start = time.perf_counter()
            actions.append(runner.step(obs, instruction))
            sync(device)
            total += time.perf_counter() - start
            count += 1
    return 1000 * total / count, actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per episode (the window fills after window_size)")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "policy_step.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. model.window_size=16")
    args = parser.parse_args()

    cfg = load_config([*RANDOM_WEIGHTS, *args.overrides], ROOT / "conf")
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    instructions = [get_task(name).instruction for name in TASKS]
    processor = build_offline_processor(instructions, vocab_size=cfg.model.vocab_size, image_size=cfg.model.image_size)
    model = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    policy = PolicyRuntime(model, processor, ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max), device)
    baseline = WindowRecompute(policy)
    episodes = [
        synthetic_episode(args.steps, cfg.sim.static_camera_size, cfg.sim.gripper_camera_size, seed=i)
        for i in range(args.episodes)
    ]
    instruction = instructions[0]

    time_episodes(policy, episodes[:1], instruction, device)  # warm-up: allocator, kernels, caches
    time_episodes(baseline, episodes[:1], instruction, device)
    base_ms, base_actions = time_episodes(baseline, episodes, instruction, device)
    cached_ms, cached_actions = time_episodes(policy, episodes, instruction, device)
    max_diff = float(np.max(np.abs(np.stack(base_actions) - np.stack(cached_actions))))

    params = sum(p.numel() for p in model.parameters())
    result = {
        "benchmark": "policy_step",
        "baseline": "re-encode the window every step",
        "baseline_ms_per_step": round(base_ms, 3),
        "cached_ms_per_step": round(cached_ms, 3),
        "speedup": round(base_ms / cached_ms, 2),
        "max_action_difference": max_diff,
        "steps": args.steps * args.episodes,
        "window_size": cfg.model.window_size,
        "image_size": cfg.model.image_size,
        "use_hand_rgb": cfg.model.use_hand_rgb,
        "backbone": cfg.model.backbone,
        "parameters": params,
        "overrides": args.overrides,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(f"policy step, {params / 1e6:.2f} M parameters, window {cfg.model.window_size}, {result['device']}:")
    print(f"  baseline (re-encode window) {base_ms:8.2f} ms/step")
    print(f"  PolicyRuntime.step (cache)  {cached_ms:8.2f} ms/step   {result['speedup']:.2f}x")
    print(f"  max |action difference|     {max_diff:.2e}")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
