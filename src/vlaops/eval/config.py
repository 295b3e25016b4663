"""Settings of the evaluate stage: CALVIN-style closed-loop chains plus offline action metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    # CALVIN (evaluation/evaluate_policy.py) runs 1000 chains of 5 with EP_LEN=360 steps per subtask.
    # The embedded default runs fewer, shorter chains so the whole pipeline fits in minutes on a CPU.
    num_chains: int = 10
    chain_length: int = 5
    max_steps_per_subtask: int = 120
    seed: int = 1000  # chain and scene seeds; distinct from the collect seeds, so no demo is replayed
    tasks: list[str] = field(default_factory=list)  # empty: every task of sim.tasks
    offline_batches: int = 0  # validation batches for the offline action error; 0: the whole split
    batch_size: int = 4
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        for name in ("num_chains", "chain_length", "max_steps_per_subtask", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.offline_batches < 0:
            raise ValueError(f"eval.offline_batches must be >= 0, got {self.offline_batches!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"eval.device must be auto, cpu or cuda[:N], got {self.device!r}")
