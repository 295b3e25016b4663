"""CALVIN's multi-step protocol (calvin_models/calvin_agent/evaluation/evaluate_policy.py).

For each seeded chain of instructions: reset the scene, then for each subtask reset the policy,
roll out for at most EP_LEN steps, ask the task oracle after every step, and stop the chain at
the first failure. SR i is the fraction of chains that completed at least i subtasks in a row;
Avg. Len is the mean number completed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from vlaops import tracking
from vlaops.eval.env import EvalEnv, StepPolicy, TaskOracle


@dataclass
class ChainResult:
    seed: int
    tasks: list[str]
    completed: int  # subtasks completed in a row before the first failure
    steps: list[int] = field(default_factory=list)  # steps used per attempted subtask


OnStep = Callable[[dict[str, Any], int], None]  # (observation the policy saw, subtask index) -> None


def rollout(
    env: EvalEnv,
    policy: StepPolicy,
    task: TaskOracle,
    obs: dict[str, Any],
    max_steps: int,
    on_step: OnStep | None = None,
    subtask: int = 0,
) -> tuple[bool, int, dict[str, Any]]:
    """One subtask: returns (success, steps used, last observation). ``on_step`` sees every observation
    the policy is given (the rollout videos record them)."""
    policy.reset()
    start_info = env.get_info()
    for step in range(1, max_steps + 1):
        if on_step is not None:
            on_step(obs, subtask)
        action = policy.step(obs, task.instruction)
        obs = env.step(action)
        if task.success(start_info, env.get_info()):
            return True, step, obs
    return False, max_steps, obs


def run_chain(
    env: EvalEnv,
    policy: StepPolicy,
    seed: int,
    names: Sequence[str],
    get_task: Callable[[str], TaskOracle],
    max_steps: int,
    on_step: OnStep | None = None,
) -> ChainResult:
    """One chain from ``env.reset(seed)``: its subtasks in order, stopping at the first failure.

    Everything a chain depends on is reset here (the scene from its seed, the policy per subtask), so a
    chain's result does not depend on which chains ran before it in the same process.
    """
    obs = env.reset(seed)
    result = ChainResult(seed=seed, tasks=list(names), completed=0)
    for i, name in enumerate(names):
        success, steps, obs = rollout(env, policy, get_task(name), obs, max_steps, on_step, i)
        result.steps.append(steps)
        if not success:
            break
        result.completed += 1
    return result


def evaluate_chains(
    env: EvalEnv,
    policy: StepPolicy,
    chains: list[tuple[int, list[str]]],
    get_task: Callable[[str], TaskOracle],
    max_steps: int,
) -> list[ChainResult]:
    """Run every (scene seed, task names) chain in this process; the seeds make the run reproducible.

    ``vlaops.eval.runner.run_chains`` runs the same chains across worker processes.
    """
    return [
        run_chain(env, policy, seed, names, get_task, max_steps)
        for seed, names in tqdm(chains, desc="evaluate chains", unit="chain", disable=None)
    ]


FIRST_SUBTASK, LATER_SUBTASKS = "first", "later"  # summarize's start_info: from the reset scene, after another subtask


def summarize(results: list[ChainResult], chain_length: int) -> dict[str, Any]:
    """SR 1..chain_length, Avg. Len and per-task success, as CALVIN's ``count_success`` computes them, and
    ``start_info``: the attempted subtasks that started from the reset scene (each chain's first) against
    those that started where the previous subtask left the arm and the blocks. Demonstrations that all
    start from a reset scene teach the first kind only; this split shows whether that is what ends chains."""
    completed = np.array([r.completed for r in results])
    chain_sr = {i: float(np.mean(completed >= i)) for i in range(1, chain_length + 1)}
    attempts: Counter[str] = Counter()
    successes: Counter[str] = Counter()
    start_info = {kind: {"success": 0, "total": 0} for kind in (FIRST_SUBTASK, LATER_SUBTASKS)}
    for r in results:
        for i, name in enumerate(r.tasks[: len(r.steps)]):
            attempts[name] += 1
            successes[name] += int(i < r.completed)
            kind = start_info[FIRST_SUBTASK if i == 0 else LATER_SUBTASKS]
            kind["total"] += 1
            kind["success"] += int(i < r.completed)
    task_info = {t: {"success": successes[t], "total": attempts[t]} for t in sorted(attempts)}
    return {
        "avg_seq_len": float(completed.mean()),
        "chain_sr": chain_sr,
        "task_info": task_info,
        "start_info": start_info,
        "num_chains": len(results),
    }


def start_sr(summary: dict[str, Any]) -> dict[str, float | None]:
    """Success rate of the subtasks attempted from the reset scene and after another one (None: none attempted)."""
    return {k: v["success"] / v["total"] if v["total"] else None for k, v in summary["start_info"].items()}


def bootstrap_ci(
    completed: Sequence[int],
    chain_length: int,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals over chains: {"avg_len": [lo, hi], "sr_1": [lo, hi], ...}.

    Chains are the independent unit (the subtasks of one chain are not: each starts where the last
    ended), so whole chains are resampled with replacement, ``resamples`` times from a generator seeded
    by ``seed``, and the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles
    (numpy's default linear interpolation) of each statistic over the resamples. With 50 chains an SR
    near 0.5 is known to about +-0.14; the interval says so beside the figure.
    """
    done = np.asarray(completed, dtype=np.int64)  # (N,)
    if done.ndim != 1 or done.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of completed counts, got shape {done.shape}")
    rng = np.random.default_rng(seed)
    sample = done[rng.integers(0, done.size, size=(resamples, done.size))]  # (B, N)
    tail = (1.0 - confidence) / 2.0 * 100.0
    q = [tail, 100.0 - tail]

    def interval(stat: np.ndarray) -> list[float]:  # (B,) -> [lo, hi]
        lo, hi = np.percentile(stat, q)
        return [float(lo), float(hi)]

    out = {tracking.AVG_LEN: interval(sample.mean(axis=1))}
    for i in range(1, chain_length + 1):
        out[f"{tracking.SR_PREFIX}{i}"] = interval((sample >= i).mean(axis=1))
    return out


def figures(
    results: list[ChainResult], chain_length: int, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """The headline figures of one run of chains and their bootstrap intervals (metrics.json's keys):
    {"avg_len": x, "sr_1": x, ..., "avg_len_ci": [lo, hi], "sr_1_ci": [lo, hi], ...}."""
    summary = summarize(results, chain_length)
    out: dict[str, Any] = {tracking.AVG_LEN: summary["avg_seq_len"]}
    out.update({f"{tracking.SR_PREFIX}{i}": sr for i, sr in summary["chain_sr"].items()})
    ci = bootstrap_ci([r.completed for r in results], chain_length, resamples, confidence, seed)
    out.update({f"{key}{tracking.CI_SUFFIX}": interval for key, interval in ci.items()})
    return out


def summary_table(rows: dict[str, dict[str, Any]], chain_length: int, confidence: float = 0.95) -> str:
    """A fixed-width table, one row per run of the same chains: Avg. Len [CI] and SR_1..SR_n.

    ``rows``: {run name: :func:`figures` output}, printed in the given order.
    """
    width = max([len(name) for name in rows] + [6])
    ci_head = f"Avg. Len [{confidence:.0%} CI]"
    head = f"{'run':<{width}}  {ci_head:<22}" + "".join(f"  SR_{i:<2}" for i in range(1, chain_length + 1))
    lines = [head, "-" * len(head)]
    for name, fig in rows.items():
        lo, hi = fig[f"{tracking.AVG_LEN}{tracking.CI_SUFFIX}"]
        avg = f"{fig[tracking.AVG_LEN]:.2f} [{lo:.2f}, {hi:.2f}]"
        srs = "".join(f"  {fig[f'{tracking.SR_PREFIX}{i}']:>5.2f}" for i in range(1, chain_length + 1))
        lines.append(f"{name:<{width}}  {avg:<22}{srs}")
    return "\n".join(lines)


def results_json(summary: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """CALVIN's results.json: {checkpoint: {avg_seq_len, chain_sr {"1": sr ...}, task_info}}."""
    return {
        checkpoint: {
            "avg_seq_len": summary["avg_seq_len"],
            "chain_sr": {str(k): v for k, v in summary["chain_sr"].items()},
            "task_info": summary["task_info"],
        }
    }
