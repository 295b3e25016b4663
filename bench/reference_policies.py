"""Floor and ceiling of the embedded tabletop: is the data honest, and does the simulator need vision?

Measures, in the simulator without rendering (the expert and the blind baseline never read images):
  * the scripted expert's demonstrations, exactly the ones ``collect`` records for this config: the
    fraction of arm values the RoboVLMs normalisation (data.norm_min / norm_max) clips, episode lengths;
  * the expert per task over ``--seeds`` fresh scenes, every action through normalize -> denormalize
    as a trained policy's output goes (the ceiling a policy can reach);
  * the blind baseline (``vlaops.eval.blind.BlindPolicy``: instruction + TCP + gripper command,
    nearest neighbour over those demonstrations, no camera) and the round-trip expert on the
    evaluate stage's seeded chains (eval.seed, ``--chains`` of eval.chain_length).

    python bench/reference_policies.py                         # 30 scenes per task, 50 chains
    python bench/reference_policies.py --seeds 5 --chains 10 sim.block_y_range=[-0.05,0.05]

Overrides are Hydra overrides of conf/. Prints a table and writes reports/bench/reference_policies.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.config import load_config
from vlaops.data.normalization import ActionNormalizer
from vlaops.eval.blind import BlindPolicy
from vlaops.eval.chains import evaluate_chains, summarize
from vlaops.eval.reference import ExpertPolicy
from vlaops.io.calvin import rel_actions_from_abs
from vlaops.sim import TabletopEnv, get_task, run_expert, seeded_chains
from vlaops.sim.record import episode_seed, expert_episodes
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
CLIP_TOL = 1e-6  # float round-off of the abs -> rel recomputation is not clipping
BENCH_SEED_OFFSET = 7919  # scenes of the per-task measurement: not the collect seeds, not the eval seeds


class RoundTripEnv:
    """The env, but every action first goes through normalize -> denormalize, as a policy's output does."""

    def __init__(self, env: TabletopEnv, norm: ActionNormalizer) -> None:
        self._env, self._norm = env, norm

    def step(self, action: np.ndarray) -> dict[str, Any]:
        return self._env.step(self._norm.denormalize(self._norm.normalize(np.asarray(action, dtype=np.float64))))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30, help="scenes per task for the expert's success")
    parser.add_argument("--chains", type=int, default=50, help="evaluation chains (eval.seed, eval.chain_length)")
    parser.add_argument("--k", type=int, default=1, help="neighbours of the blind baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "reference_policies.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. sim.episodes_per_task=10")
    args = parser.parse_args()

    cfg = load_config(args.overrides, ROOT / "conf")
    sim, tasks = cfg.sim, list(cfg.eval.tasks or cfg.sim.tasks)
    norm = ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max)
    started = time.perf_counter()
    with TabletopEnv(sim, render=False) as env:
        # 1. The demonstrations collect records (same seeds), as convert turns them into rel_actions.
        names, obs, rels, demo_len = [], [], [], {}
        for name in sim.tasks:
            demo_len[name] = []
            for _, rec in expert_episodes(env, sim, name):
                robot_obs = np.stack([f.obs["robot_obs"] for f in rec.frames])  # (T, 15)
                rel = rel_actions_from_abs(np.stack([f.action_abs for f in rec.frames]), robot_obs)  # (T, 7)
                names += [rec.instruction] * len(rel)
                obs.append(robot_obs)
                rels.append(rel)
                demo_len[name].append(len(rel))
        arm = np.concatenate(rels)[:, :6]  # (N, 6)
        clipped = float(np.mean(np.abs(arm) > max(-norm.norm_min, norm.norm_max) + CLIP_TOL))
        clipped_strict = float(np.mean((arm > norm.norm_max) | (arm < norm.norm_min)))

        # 2. The expert per task on fresh scenes, through the normalisation round trip.
        rt = RoundTripEnv(env, norm)
        per_task: dict[str, dict[str, Any]] = {}
        for name in sim.tasks:
            task = get_task(name)
            first = get_task(task.setup) if task.setup is not None else task
            wins, lengths, scene, skipped = 0, [], 0, 0
            while len(lengths) < args.seeds:
                env.reset(episode_seed(sim.seed + BENCH_SEED_OFFSET, name, scene))
                scene += 1
                if not first.precondition(env.get_info()):
                    skipped += 1
                    continue
                if task.setup is not None and not run_expert(rt, task.setup, sim.max_episode_steps)[0]:
                    lengths.append(0)
                    continue
                ok, steps, _ = run_expert(rt, task, sim.max_episode_steps)
                wins += int(ok)
                lengths.append(steps)
            per_task[name] = {
                "success": wins,
                "total": args.seeds,
                "mean_steps": round(float(np.mean(lengths)), 1),
                "max_steps": int(max(lengths)),
                "infeasible_scenes_skipped": skipped,
            }
            print(
                f"  expert {name:18s} {wins}/{args.seeds}  steps mean {per_task[name]['mean_steps']:5.1f} "
                f"max {per_task[name]['max_steps']}",
                flush=True,
            )

        # 3. Blind baseline and round-trip expert on the evaluate stage's chains.
        blind = BlindPolicy(names, np.concatenate(obs), np.concatenate(rels), args.k)
        chains = seeded_chains(env, tasks, args.chains, cfg.eval.chain_length, cfg.eval.seed)
        max_steps = cfg.eval.max_steps_per_subtask
        blind_sum = summarize(evaluate_chains(env, blind, chains, get_task, max_steps), cfg.eval.chain_length)
        expert_sum = summarize(
            evaluate_chains(rt, ExpertPolicy(env), chains, get_task, max_steps), cfg.eval.chain_length
        )

    def chain_figures(s: dict[str, Any]) -> dict[str, Any]:
        return {
            "avg_len": s["avg_seq_len"],
            **{f"sr_{i}": v for i, v in s["chain_sr"].items()},
            "task_info": s["task_info"],
        }

    lengths_all = [n for v in demo_len.values() for n in v]
    result = {
        "benchmark": "reference_policies",
        "demos": {
            "episodes": len(lengths_all),
            "frames": int(len(arm)),
            "clipped_fraction": clipped,
            "clipped_fraction_no_tolerance": clipped_strict,
            "max_abs_arm": float(np.abs(arm).max()),
            "mean_steps": round(float(np.mean(lengths_all)), 1),
            "max_steps": int(max(lengths_all)),
            "norm_range": [norm.norm_min, norm.norm_max],
            "expert_max_action": sim.expert_max_action,
        },
        "expert_round_trip_per_task": per_task,
        "chains": {
            "num_chains": args.chains,
            "chain_length": cfg.eval.chain_length,
            "seed": cfg.eval.seed,
            "max_steps_per_subtask": max_steps,
        },
        "blind": {"k": args.k, **chain_figures(blind_sum)},
        "expert_round_trip_chains": chain_figures(expert_sum),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "overrides": args.overrides,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    d = result["demos"]
    print(
        f"demos: {d['episodes']} episodes, {d['frames']} frames, steps mean {d['mean_steps']} max {d['max_steps']}; "
        f"arm values clipped at [{norm.norm_min}, {norm.norm_max}]: {clipped:.4f} "
        f"({clipped_strict:.4f} without the {CLIP_TOL} round-off tolerance), max |arm| {d['max_abs_arm']:.4f}"
    )
    worst = min(v["success"] / v["total"] for v in per_task.values())
    print(f"expert through the round trip, {args.seeds} scenes per task: worst task {worst:.3f}")
    for label, s in (("blind baseline", blind_sum), ("expert (round trip)", expert_sum)):
        srs = ", ".join(f"{v:.2f}" for v in s["chain_sr"].values())
        print(f"{label:20s} {args.chains} chains: SR {srs} / Avg. Len {s['avg_seq_len']:.2f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
