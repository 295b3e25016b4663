"""How often does the scripted CALVIN expert solve each task it covers? Measured by calvin_env's own oracle.

For each task of ``vlaops.sim.calvin.expert.EXPERT_TASKS``: ``--scenes`` initial scenes (CALVIN's initial
conditions from which the task is feasible, in a fixed shuffled order, each placed as CALVIN's evaluation
places it), the expert planned from the start state and run for at most CALVIN's 360 steps, success asked
of ``Tasks.get_task_info_for_set`` after every step, as in a chain. No camera is rendered.

    python bench/calvin_expert.py                 # every covered task, 30 scenes each
    python bench/calvin_expert.py --tasks turn_on_led --scenes 5
    python bench/calvin_expert.py --chains 100 --scenes 0   # only the expert on CALVIN's first 100 chains

``--chains N`` also plays the expert (the ``expert`` reference of ``eval.env=calvin``) on the first N of
CALVIN's sequences, on ``--workers`` processes: SR_1..5 and Avg. Len with 95 % bootstrap intervals, and how many
of those chains name a task the expert does not cover (where it holds still and the chain ends).

Writes reports/bench/calvin_expert.json: per task successes / attempts and the steps used, the tasks not
covered, the machine and the time taken. Needs calvin_env (docs/calvin.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.eval.chains import figures
from vlaops.eval.runner import ExpertFactory, run_chains
from vlaops.sim.calvin.config import CALVIN_EP_LEN, CalvinConfig
from vlaops.sim.calvin.env import CalvinEnv, chain_list
from vlaops.sim.calvin.expert import EXPERT_TASKS, UNCOVERED, CalvinExpert
from vlaops.sim.calvin.sequences import initial_conditions, initial_state, next_states
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]


def setup_for(condition: dict[str, Any], task: str) -> str | None:
    """ "" when ``task`` is feasible from ``condition`` itself; else the table lift after which it is (the
    place tasks need a held block: CALVIN's chains reach them after a lift); None: neither."""
    if len(next_states(condition, task)) == 1:
        return ""
    for colour in ("red", "blue", "pink"):
        lift = f"lift_{colour}_block_table"
        after = next_states(condition, lift)
        if len(after) == 1 and len(next_states(after[0], task)) == 1:
            return lift
    return None


def play(env: CalvinEnv, task: str) -> int | None:
    """The expert on ``task`` from the current state: steps until the oracle says done, None if never."""
    oracle = env.get_task(task)
    start = env.get_info()
    expert = CalvinExpert(task, start)
    for step in range(1, CALVIN_EP_LEN + 1):
        env.step(expert.act(env.get_info()))
        if oracle.success(start, env.get_info()):
            return step
    return None


def measure(env: CalvinEnv, task: str, scenes: int, seed: int) -> dict[str, Any]:
    """The expert on ``task`` from the first ``scenes`` initial conditions of a seeded shuffle from which it is
    feasible, after the expert's own lift where the task needs a held block (a failed lift is counted apart)."""
    conditions = initial_conditions()
    order = np.random.default_rng(seed).permutation(len(conditions))
    setups = [(conditions[i], setup_for(conditions[i], task)) for i in order]
    feasible = [(c, s) for c, s in setups if s is not None][:scenes]
    steps: list[int | None] = []
    failed_setups = 0
    for condition, setup in feasible:
        env.reset_to(*initial_state(condition))
        if setup and play(env, setup) is None:
            failed_setups += 1
            continue
        steps.append(play(env, task))
    done = [s for s in steps if s is not None]
    return {
        "success": len(done),
        "total": len(steps),
        "rate": len(done) / len(steps),
        "mean_steps": float(np.mean(done)) if done else None,
        "steps": steps,
        "after": sorted({s for _, s in feasible if s}),  # the setup lifts, for the place tasks
        "failed_setups": failed_setups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(EXPERT_TASKS), help="comma-separated covered tasks")
    parser.add_argument("--scenes", type=int, default=30, help="initial scenes per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scene order")
    parser.add_argument("--chains", type=int, default=0, help="also the expert on CALVIN's first N chains")
    parser.add_argument("--update", action="store_true", help="replace these tasks' entries in an existing --out")
    parser.add_argument("--workers", type=int, default=1, help="worker processes for --chains")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "calvin_expert.json")
    args = parser.parse_args()

    start = time.perf_counter()
    results: dict[str, Any] = {}
    with CalvinEnv(CalvinConfig(), render=False) as env:
        for task in args.tasks.split(",") if args.scenes else []:
            began = time.perf_counter()
            results[task] = measure(env, task, args.scenes, args.seed)
            results[task]["seconds"] = round(time.perf_counter() - began, 1)
            r = results[task]
            print(f"{task:<26} {r['success']:>2}/{r['total']}  mean steps {r['mean_steps']}", flush=True)
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.update and args.out.is_file() else {}
    if args.chains:
        chains = chain_list(args.chains)
        played = time.perf_counter()
        outcome = run_chains(ExpertFactory(), CalvinConfig(), chains, CALVIN_EP_LEN, args.workers, desc="expert")
        fig = figures(outcome, 5)
        uncovered = sum(any(t in UNCOVERED for t in tasks) for _, tasks in chains)
        report["chains"] = {
            "num_chains": len(chains),
            "with_an_uncovered_task": uncovered,
            "first_task_uncovered": sum(tasks[0] in UNCOVERED for _, tasks in chains),
            "workers": args.workers,
            "seconds": round(time.perf_counter() - played, 1),
            **fig,
        }
        print({k: v for k, v in report["chains"].items()}, flush=True)
    if args.update:  # the other tasks' entries as measured before; tasks no longer covered dropped
        results = {t: v for t, v in {**report.get("tasks", {}), **results}.items() if t in EXPERT_TASKS}
    report.update(
        {
            "tasks": results,
            "covered": len(EXPERT_TASKS),
            "uncovered": list(UNCOVERED),
            "scenes_per_task": max(r["total"] + r.get("failed_setups", 0) for r in results.values()) if results else 0,
            "max_steps": CALVIN_EP_LEN,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "load_average": os.getloadavg(),
        }
    )
    if not args.update:
        report["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, report)
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
