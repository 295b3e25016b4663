"""How often does the scripted CALVIN expert solve each task it covers? Measured by calvin_env's own oracle.

For each task of ``vlaops.sim.calvin.expert.EXPERT_TASKS``: ``--scenes`` initial scenes (CALVIN's initial
conditions from which the task is feasible, in a fixed shuffled order, each placed as CALVIN's evaluation
places it), the expert planned from the start state and run for at most CALVIN's 360 steps, success asked
of ``Tasks.get_task_info_for_set`` after every step, as in a chain. No camera is rendered.

    python bench/calvin_expert.py                 # every covered task, 30 scenes each
    python bench/calvin_expert.py --tasks turn_on_led --scenes 5

Writes reports/bench/calvin_expert.json: per task successes / attempts and the steps used, the tasks not
covered, the machine and the time taken. Needs calvin_env (docs/calvin.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.sim.calvin.config import CALVIN_EP_LEN, CalvinConfig
from vlaops.sim.calvin.env import CalvinEnv
from vlaops.sim.calvin.expert import EXPERT_TASKS, UNCOVERED, CalvinExpert
from vlaops.sim.calvin.sequences import initial_conditions, initial_state, next_states
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]


def measure(env: CalvinEnv, task: str, scenes: int, seed: int) -> dict[str, Any]:
    """The expert on ``task`` from the first ``scenes`` feasible initial conditions of a seeded shuffle."""
    conditions = initial_conditions()
    order = np.random.default_rng(seed).permutation(len(conditions))
    feasible = [conditions[i] for i in order if len(next_states(conditions[i], task)) == 1][:scenes]
    oracle = env.get_task(task)
    steps: list[int | None] = []
    for condition in feasible:
        env.reset_to(*initial_state(condition))
        start = env.get_info()
        expert = CalvinExpert(task, start)
        used = None
        for step in range(1, CALVIN_EP_LEN + 1):
            env.step(expert.act(env.get_info()))
            if oracle.success(start, env.get_info()):
                used = step
                break
        steps.append(used)
    done = [s for s in steps if s is not None]
    return {
        "success": len(done),
        "total": len(steps),
        "rate": len(done) / len(steps),
        "mean_steps": float(np.mean(done)) if done else None,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(EXPERT_TASKS), help="comma-separated covered tasks")
    parser.add_argument("--scenes", type=int, default=30, help="initial scenes per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scene order")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "calvin_expert.json")
    args = parser.parse_args()

    start = time.perf_counter()
    results: dict[str, Any] = {}
    with CalvinEnv(CalvinConfig(), render=False) as env:
        for task in args.tasks.split(","):
            results[task] = measure(env, task, args.scenes, args.seed)
            r = results[task]
            print(f"{task:<26} {r['success']:>2}/{r['total']}  mean steps {r['mean_steps']}", flush=True)
    report = {
        "tasks": results,
        "covered": len(EXPERT_TASKS),
        "uncovered": list(UNCOVERED),
        "scenes_per_task": args.scenes,
        "max_steps": CALVIN_EP_LEN,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }
    write_json(args.out, report)
    print(f"wrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
