"""CALVIN's multi-step protocol (calvin_models/calvin_agent/evaluation/evaluate_policy.py).

For each seeded chain of instructions: reset the scene, then for each subtask reset the policy,
roll out for at most EP_LEN steps, ask the task oracle after every step, and stop the chain at
the first failure. SR i is the fraction of chains that completed at least i subtasks in a row;
Avg. Len is the mean number completed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from vlaops.eval.env import EvalEnv, StepPolicy, TaskOracle


@dataclass
class ChainResult:
    seed: int
    tasks: list[str]
    completed: int  # subtasks completed in a row before the first failure
    steps: list[int] = field(default_factory=list)  # steps used per attempted subtask


def rollout(env: EvalEnv, policy: StepPolicy, task: TaskOracle, obs: dict[str, Any], max_steps: int) -> tuple[bool, int, dict[str, Any]]:
    """One subtask: returns (success, steps used, last observation)."""
    policy.reset()
    start_info = env.get_info()
    for step in range(1, max_steps + 1):
        action = policy.step(obs, task.instruction)
        obs = env.step(action)
        if task.success(start_info, env.get_info()):
            return True, step, obs
    return False, max_steps, obs


def evaluate_chains(
    env: EvalEnv,
    policy: StepPolicy,
    chains: list[tuple[int, list[str]]],
    get_task: Callable[[str], TaskOracle],
    max_steps: int,
) -> list[ChainResult]:
    """Run every (scene seed, task names) chain; the order and seeds make the run reproducible."""
    results = []
    for seed, names in tqdm(chains, desc="evaluate chains", unit="chain", disable=None):
        obs = env.reset(seed)
        result = ChainResult(seed=seed, tasks=list(names), completed=0)
        for name in names:
            success, steps, obs = rollout(env, policy, get_task(name), obs, max_steps)
            result.steps.append(steps)
            if not success:
                break
            result.completed += 1
        results.append(result)
    return results


def summarize(results: list[ChainResult], chain_length: int) -> dict[str, Any]:
    """SR 1..chain_length, Avg. Len and per-task success, as CALVIN's ``count_success`` computes them."""
    completed = np.array([r.completed for r in results])
    chain_sr = {i: float(np.mean(completed >= i)) for i in range(1, chain_length + 1)}
    attempts: Counter[str] = Counter()
    successes: Counter[str] = Counter()
    for r in results:
        for i, name in enumerate(r.tasks[: len(r.steps)]):
            attempts[name] += 1
            successes[name] += int(i < r.completed)
    task_info = {t: {"success": successes[t], "total": attempts[t]} for t in sorted(attempts)}
    return {"avg_seq_len": float(completed.mean()), "chain_sr": chain_sr, "task_info": task_info, "num_chains": len(results)}


def results_json(summary: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """CALVIN's results.json: {checkpoint: {avg_seq_len, chain_sr {"1": sr ...}, task_info}}."""
    return {
        checkpoint: {
            "avg_seq_len": summary["avg_seq_len"],
            "chain_sr": {str(k): v for k, v in summary["chain_sr"].items()},
            "task_info": summary["task_info"],
        }
    }
