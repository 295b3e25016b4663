"""calvin_env's speed on this machine: what a step costs with each camera rendered, and chains per minute of
CALVIN's evaluation on 1 and 2 workers.

- **steps/s**: ``--steps`` steps of ``CalvinEnv`` (a still arm; the oracle's ``get_info`` after each step, as a
  chain asks it) with no camera, the static camera only, and both (static 200x200 + gripper 84x84; EGL off:
  PyBullet's CPU renderer).
- **chains/min**: ``run_chains`` on the first ``--chains`` of CALVIN's sequences, on 1 and then 2 local
  workers, with (a) the scripted expert (no rendering; a chain ends at its first task the expert does not
  cover) and (b) the default tiny policy, random weights, both cameras rendered, ``--policy-steps`` steps per
  subtask (it fails each chain's first subtask, so every chain is exactly that many policy steps). The
  results of 1 and 2 workers are checked to be equal.

    python bench/calvin_speed.py
    python bench/calvin_speed.py --steps 100 --chains 8 --policy-steps 30

Writes reports/bench/calvin_speed.json with the machine, its load average before and after, and ``uptime``:
on a shared machine say under what load a figure was taken.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.config import load_config, to_container
from vlaops.eval.runner import ExpertFactory, RuntimeFactory, run_chains
from vlaops.sim.calvin.config import CalvinConfig
from vlaops.sim.calvin.env import CalvinEnv, chain_list
from vlaops.sim.calvin.instructions import instructions
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]

# random weights: what a step costs does not depend on them, and models/pretrained need not exist
RANDOM_WEIGHTS = ["model.pretrained_dir=null"]


def step_rate(cameras: tuple[str, ...], steps: int) -> dict[str, float]:
    start = time.perf_counter()
    env = CalvinEnv(CalvinConfig(), render=bool(cameras), cameras=cameras or ("static", "gripper"))
    built = time.perf_counter() - start
    try:
        env.reset(0)
        still = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
        start = time.perf_counter()
        for _ in range(steps):
            env.step(still)
            env.get_info()
        seconds = time.perf_counter() - start
    finally:
        env.close()
    return {
        "build_s": round(built, 2),
        "steps_per_s": round(steps / seconds, 2),
        "ms_per_step": round(1000 * seconds / steps, 1),
    }


def export_policy(out: Path) -> Path:
    """The default tiny policy (conf/model/tiny.yaml), random weights, its tokenizer knowing CALVIN's instructions."""
    import torch

    from vlaops.data.normalization import ActionNormalizer
    from vlaops.model import VLAPolicy, build_offline_processor, save_policy

    cfg = load_config(RANDOM_WEIGHTS, ROOT / "conf")
    processor = build_offline_processor(
        list(instructions().values()), vocab_size=cfg.model.vocab_size, image_size=cfg.model.image_size
    )
    torch.manual_seed(0)
    policy = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    normalizer = ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max)
    return save_policy(out, policy, processor, normalizer, cfg.model, extra={"train_config": to_container(cfg)})


def chain_rate(factory: Any, chains: list, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    results = {}
    for workers in (1, 2):
        start = time.perf_counter()
        results[workers] = run_chains(factory, CalvinConfig(), chains, steps, workers, desc=None)
        seconds = time.perf_counter() - start
        total_steps = sum(sum(r.steps) for r in results[workers])
        out[f"workers_{workers}"] = {
            "seconds": round(seconds, 1),
            "chains_per_min": round(60 * len(chains) / seconds, 2),
            "steps_per_s": round(total_steps / seconds, 1),
        }
    same = [(r.completed, r.steps) for r in results[1]] == [(r.completed, r.steps) for r in results[2]]
    out["same_results"] = same
    out["avg_len"] = float(np.mean([r.completed for r in results[1]]))
    out["speedup_2_workers"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 2)
    return out


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps per camera setting")
    parser.add_argument("--chains", type=int, default=6, help="CALVIN sequences per chain run")
    parser.add_argument("--policy-steps", type=int, default=20, help="steps per subtask of the policy's chains")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "calvin_speed.json")
    args = parser.parse_args()

    report: dict[str, Any] = {"load_before": os.getloadavg(), "uptime_before": uptime()}
    report["steps"] = {
        name: step_rate(cameras, args.steps)
        for name, cameras in (("no_camera", ()), ("static", ("static",)), ("static_and_gripper", ("static", "gripper")))
    }
    print(report["steps"], flush=True)
    chains = chain_list(args.chains)
    report["expert_chains"] = chain_rate(ExpertFactory(), chains, 360)
    print("expert", report["expert_chains"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        policy = RuntimeFactory(str(export_policy(Path(tmp) / "policy")))
        report["policy_chains"] = chain_rate(policy, chains, args.policy_steps)
    print("policy", report["policy_chains"], flush=True)
    report.update(
        chains=args.chains,
        policy_steps_per_subtask=args.policy_steps,
        load_after=os.getloadavg(),
        uptime_after=uptime(),
        machine={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
