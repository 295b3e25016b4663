"""Which block does the policy go to? The instruction's colour tied to the image, measured in closed loop.

A subtask the policy fails can fail two ways: it goes to the instructed block and misses it by a few
centimetres (precision), or it goes to another block (grounding: the colour in the instruction is not tied
to the image). The success rate does not tell them apart; this does. It plays the first subtask of the
evaluation's chains (the scenes and tasks ``vlaops evaluate`` plays: ``eval.seed``, ``eval.chain_length``,
at most ``eval.max_steps_per_subtask`` steps; Hydra overrides of conf/ as arguments) and records the
TCP's closest approach to every block (3-D, TCP to the block's centre: an arm travelling over a block at
its safe height does not count as reaching it). A grounded policy comes closest to the instructed block; one
that picks a block at random does so in 1 of 3 (the simulator's three blocks), the chance level printed
beside it. The scripted expert (``--expert``) is the ceiling: always the instructed block.

    python bench/grounding.py --policy models/policy --chains 24
    python bench/grounding.py --expert --chains 24
    python bench/grounding.py --policy runs/x/policy sim.block_yaw_range=0.3

Prints a line per episode and a summary, and writes reports/bench/grounding.json. CPU, one thread;
about 7 s per failed episode with a policy on a 2-core EPYC (90 rendered steps and their inference).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlaops.config import load_config
from vlaops.eval.chains import rollout
from vlaops.eval.env import StepPolicy
from vlaops.eval.reference import ExpertPolicy
from vlaops.sim import TabletopEnv, get_task, seeded_chains
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]


def _pos(info: dict[str, Any], block: str) -> np.ndarray:
    return np.asarray(info["blocks"][block]["pos"], dtype=float)  # (3,)


def approach(env: TabletopEnv, policy: StepPolicy, seed: int, task_name: str, max_steps: int) -> dict[str, Any]:
    """One subtask from ``env.reset(seed)``: success, and the TCP's closest approach (cm) to each block."""
    task = get_task(task_name)
    obs = env.reset(seed)
    start = env.get_info()
    closest = {block: np.inf for block in start["blocks"]}

    def track(info: dict[str, Any]) -> None:
        tcp = np.asarray(info["tcp_pos"], dtype=float)
        for block in closest:
            closest[block] = min(closest[block], float(np.linalg.norm(tcp - _pos(info, block))))

    success, steps, _ = rollout(env, policy, task, obs, max_steps, on_step=lambda _obs, _i: track(env.get_info()))
    track(env.get_info())  # the state after the last step
    tcp0 = np.asarray(start["tcp_pos"], dtype=float)
    return {
        "seed": seed,
        "task": task_name,
        "block": task.block,
        "success": bool(success),
        "steps": steps,
        "closest_cm": {block: round(100 * d, 1) for block, d in closest.items()},
        "came_closest_to": min(closest, key=closest.get),
        "nearest_at_start": min(closest, key=lambda b: float(np.linalg.norm(tcp0 - _pos(start, b)))),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fraction of episodes that came closest to the instructed block, against chance (1 / blocks)."""
    n = len(rows)
    to_block = [r["closest_cm"][r["block"]] for r in rows]
    to_other = [min(d for b, d in r["closest_cm"].items() if b != r["block"]) for r in rows]
    return {
        "episodes": n,
        "success": round(sum(r["success"] for r in rows) / n, 3),
        "came_closest_to_instructed": round(sum(r["came_closest_to"] == r["block"] for r in rows) / n, 3),
        "chance": round(1 / len(rows[0]["closest_cm"]), 3),
        "came_closest_to_nearest_at_start": round(
            sum(r["came_closest_to"] == r["nearest_at_start"] for r in rows) / n, 3
        ),
        "median_closest_cm": {"instructed": float(np.median(to_block)), "other": float(np.median(to_other))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--policy", default="models/policy", help="an exported policy directory")
    who.add_argument("--expert", action="store_true", help="the scripted expert instead (the ceiling)")
    parser.add_argument("--chains", type=int, default=24, help="the first N evaluation chains' first subtasks")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench" / "grounding.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. eval.seed=2000")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.overrides, ROOT / "conf")
    with TabletopEnv(cfg.sim, render=not args.expert) as env:
        chains = seeded_chains(
            env, list(cfg.eval.tasks or cfg.sim.tasks), args.chains, cfg.eval.chain_length, cfg.eval.seed
        )
        if args.expert:
            policy: StepPolicy = ExpertPolicy(env)
        else:
            from vlaops.model import PolicyRuntime

            policy = PolicyRuntime.load(Path(args.policy), torch.device("cpu"))
        start = time.perf_counter()
        rows = []
        for seed, tasks in chains:
            rows.append(approach(env, policy, seed, tasks[0], cfg.eval.max_steps_per_subtask))
            r = rows[-1]
            print(
                f"{r['task']:18s} {'ok ' if r['success'] else 'no '} came closest to {r['came_closest_to']:5s} "
                + " ".join(f"{b} {d:5.1f} cm" for b, d in r["closest_cm"].items()),
                flush=True,
            )
    summary = summarise(rows)
    print(
        f"{len(rows)} episodes in {time.perf_counter() - start:.0f} s: came closest to the instructed block in "
        f"{summary['came_closest_to_instructed']:.2f} (chance {summary['chance']:.2f}), to the block nearest the start "
        f"in {summary['came_closest_to_nearest_at_start']:.2f}; median closest approach "
        f"{summary['median_closest_cm']['instructed']:.1f} cm "
        f"to the instructed block, {summary['median_closest_cm']['other']:.1f} cm to another; success "
        f"{summary['success']:.2f}"
    )
    write_json(
        args.out,
        {
            "policy": "expert" if args.expert else str(args.policy),
            "eval_seed": cfg.eval.seed,
            "summary": summary,
            "episodes": rows,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        },
    )


if __name__ == "__main__":
    main()
