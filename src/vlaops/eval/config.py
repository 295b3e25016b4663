"""Settings of the evaluate stage: CALVIN-style closed-loop chains plus offline action metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlaops.model.execution import ACT_ENSEMBLE_COEFF, Execution
from vlaops.sim.calvin.config import CalvinConfig

# The names users may list; one home, imported by the ablation and reference modules and the stage.
# blank_images: both cameras replaced by zeros; swap_instruction: another task's instruction (eval/ablation.py).
ABLATIONS = ("blank_images", "swap_instruction")
# expert: the scripted expert (ceiling); blind: instruction + robot state only, never the cameras (floor).
REFERENCES = ("expert", "blind")
# tabletop: the embedded simulator and its seeded chains; calvin: CALVIN's simulator (calvin_env, an optional
# extra) and CALVIN's own 1000 sequences (docs/calvin.md).
ENVS = ("tabletop", "calvin")


@dataclass
class EvalConfig:
    # CALVIN (evaluation/evaluate_policy.py) runs 1000 chains of 5 with EP_LEN=360 steps per subtask.
    # The embedded default runs fewer, shorter chains so the whole pipeline fits in minutes on a CPU.
    num_chains: int = 50
    chain_length: int = 5
    max_steps_per_subtask: int = 90  # the expert needs at most 56; every failed subtask spends all of them
    seed: int = 1000  # chain and scene seeds; distinct from the collect seeds, so no demo is replayed
    tasks: list[str] = field(default_factory=list)  # empty: every task of sim.tasks
    offline_batches: int = 0  # validation batches for the offline action error; 0: the whole split
    batch_size: int = 4
    plot_episodes: int = 3  # validation episodes drawn in reports/plots/action_trajectories.png
    videos: int = 2  # the first N chains played again and saved as GIFs in reports/videos/ (0: none)
    device: str = "auto"  # auto: cuda when available, else cpu
    # Chains run in this many worker processes (each with its own simulator and policy); 0 or null: one
    # per CPU core. Results are merged by chain index, so the metrics do not depend on it.
    num_workers: int | None = None
    # The same chains again with the policy's input degraded: it must fall if the policy looks and listens.
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    # Reference policies on the same chains: the floor and the ceiling beside every figure.
    references: list[str] = field(default_factory=lambda: list(REFERENCES))
    # 95 % percentile intervals of Avg. Len and every SR by resampling the chains with replacement.
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    # Which action of the predicted chunks runs (vlaops.model.execution): first (RoboVLMs: a chunk every
    # step, its first action), chunk (chunk_steps actions open loop per prediction; null: the whole chunk)
    # or ensemble (ACT's temporal ensembling, weights exp(-ensemble_coeff * i), i = 0 the oldest prediction).
    # The ablations and the videos run the policy the same way; the expert and blind references predict no chunks.
    execute: str = "first"
    chunk_steps: int | None = None
    ensemble_coeff: float = ACT_ENSEMBLE_COEFF
    # Where the chains are played. calvin: the first num_chains of CALVIN's sequences, each from its own
    # initial scene, eval.calvin.max_steps_per_subtask (CALVIN's 360) steps per subtask; eval.tasks,
    # max_steps_per_subtask and seed are the tabletop's.
    env: str = "tabletop"
    calvin: CalvinConfig = field(default_factory=CalvinConfig)

    def execution(self) -> Execution:
        """The three execution settings as the runtime takes them (messages name ``eval.<key>``)."""
        return Execution(self.execute, self.chunk_steps, self.ensemble_coeff, key_prefix="eval.")

    def __post_init__(self) -> None:
        for name in ("plot_episodes", "videos"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_chains", "chain_length", "max_steps_per_subtask", "batch_size", "bootstrap_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.offline_batches < 0:
            raise ValueError(f"eval.offline_batches must be >= 0, got {self.offline_batches!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"eval.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"eval.num_workers must be >= 0 (0 or null: one per CPU core), got {self.num_workers!r}")
        if self.env not in ENVS:
            raise ValueError(f"eval.env must be one of {', '.join(ENVS)}, got {self.env!r}")
        if self.env == "calvin" and (self.tasks or self.chain_length != 5):
            raise ValueError(
                "eval.env=calvin plays CALVIN's own chains of 5: leave eval.tasks empty and eval.chain_length 5, "
                f"got tasks={list(self.tasks)}, chain_length={self.chain_length}"
            )
        if isinstance(self.calvin, dict):
            self.calvin = CalvinConfig(**self.calvin)
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"eval.confidence must be in (0, 1), got {self.confidence!r}")
        for key, allowed in (("ablations", ABLATIONS), ("references", REFERENCES)):
            values = list(getattr(self, key))
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"eval.{key}: unknown value(s) {unknown}; allowed: {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ValueError(f"eval.{key}: each value at most once, got {values}")
        self.execution()  # eval.execute, chunk_steps (>= 1; <= the policy's chunk is checked at load), ensemble_coeff
