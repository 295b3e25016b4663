"""CALVIN's chain bookkeeping: stop at the first failure, SR i = share of chains with >= i done."""

from __future__ import annotations

import numpy as np

from vlaops.eval.chains import evaluate_chains, results_json, start_sr, summarize


class CountingEnv:
    """A one-number world: each step adds the action's first component to a counter."""

    def __init__(self) -> None:
        self.value = 0.0

    def reset(self, seed):
        self.value = 0.0
        return {"value": self.value}

    def step(self, action):
        self.value += float(action[0])
        return {"value": self.value}

    def get_info(self):
        return {"value": self.value}

    def close(self):
        pass


class ReachTask:
    def __init__(self, delta):
        self.instruction = f"add {delta}"
        self.delta = delta

    def success(self, start, end):
        return end["value"] - start["value"] >= self.delta


class StepOnePolicy:
    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1

    def step(self, obs, instruction):
        return np.ones(7)


def test_chain_stops_at_first_failure_and_counts():
    tasks = {"a": ReachTask(2), "b": ReachTask(3), "far": ReachTask(100)}
    policy = StepOnePolicy()
    chains = [(0, ["a", "b", "far", "a", "b"]), (1, ["far", "a", "b", "a", "b"]), (2, ["a", "b", "a", "b", "a"])]
    results = evaluate_chains(CountingEnv(), policy, chains, tasks.__getitem__, max_steps=10)
    assert [r.completed for r in results] == [2, 0, 5]
    assert results[0].steps == [2, 3, 10]
    assert policy.resets == 3 + 1 + 5  # reset per attempted subtask
    summary = summarize(results, 5)
    assert summary["chain_sr"] == {1: 2 / 3, 2: 2 / 3, 3: 1 / 3, 4: 1 / 3, 5: 1 / 3}
    assert summary["avg_seq_len"] == (2 + 0 + 5) / 3
    assert summary["task_info"]["far"] == {"success": 0, "total": 2}
    # first subtasks: a (ok), far (fail), a (ok); later: b, far (fail) | b, a, b, a (ok)
    assert summary["start_info"] == {"first": {"success": 2, "total": 3}, "later": {"success": 5, "total": 6}}
    assert start_sr(summary) == {"first": 2 / 3, "later": 5 / 6}
    assert start_sr(summarize(results[1:2], 5)) == {"first": 0.0, "later": None}  # no subtask after a first failure
    out = results_json(summary, "policy")
    assert out["policy"]["chain_sr"]["1"] == 2 / 3
