"""Chains across worker processes: each worker builds its own simulator and policy, chains go by index.

What a worker needs travels as a small picklable *factory* (``factory(env) -> StepPolicy``), not as a
built policy: a worker loads the runtime from the export directory itself, and the expert needs the
worker's own simulator. Every chain resets the scene from its seed and the policy per subtask
(``chains.run_chain``), and the results are merged by chain index (``utils.executor.map_ordered``), so
the metrics are the same for any ``eval.num_workers`` and any executor (``compute``: local or Ray, where
each actor builds its simulator and policy once, as a local worker does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlaops.errors import VlaopsError
from vlaops.eval.ablation import NEEDS_NO_IMAGES, AblatedPolicy
from vlaops.eval.chains import ChainResult, run_chain
from vlaops.eval.env import StepPolicy, make_env, task_lookup
from vlaops.eval.reference import ExpertPolicy
from vlaops.model.execution import Execution
from vlaops.sim.config import SimConfig
from vlaops.utils.executor import ComputeConfig, map_ordered, start_method

Chain = tuple[int, list[str]]  # (scene seed, task names); under eval.env=calvin (CALVIN sequence index, task names)


@dataclass(frozen=True)
class RuntimeFactory:
    """The trained policy, loaded from its export directory in each worker, running its chunks as
    ``execution`` says (``eval.execute``)."""

    model_dir: str
    device: str = "cpu"
    needs_images: bool = True
    execution: Execution = field(default_factory=Execution)
    cameras: tuple[str, ...] | None = None  # under eval.env=calvin, the cameras it reads (None: both)

    def __call__(self, env: Any) -> StepPolicy:
        from vlaops.model import PolicyRuntime  # the model stack loads only where a worker runs it

        return PolicyRuntime.load(Path(self.model_dir), torch.device(self.device), self.execution)


@dataclass(frozen=True)
class ExpertFactory:
    """The scripted expert, reading the worker's own simulator (the tabletop's or CALVIN's)."""

    needs_images: bool = False

    def __call__(self, env: Any) -> StepPolicy:
        from vlaops.sim.calvin.config import CalvinConfig

        if isinstance(getattr(env, "cfg", None), CalvinConfig):
            from vlaops.sim.calvin.expert import CalvinExpertPolicy

            return CalvinExpertPolicy(env)
        return ExpertPolicy(env)


@dataclass(frozen=True)
class FixedFactory:
    """A policy built once in the parent (e.g. the blind baseline) and copied to each worker."""

    policy: Any
    needs_images: bool = False

    def __call__(self, env: Any) -> StepPolicy:
        return self.policy


@dataclass(frozen=True)
class AblatedFactory:
    """``inner``'s policy seen through the ablation ``mode`` (see ``eval/ablation.py``)."""

    inner: Any
    mode: str
    instructions: Mapping[str, str] = field(default_factory=dict)  # {task name: instruction}, for swaps

    @property
    def needs_images(self) -> bool:
        return self.inner.needs_images and self.mode not in NEEDS_NO_IMAGES

    @property
    def device(self) -> str:
        return str(getattr(self.inner, "device", "cpu"))

    @property
    def cameras(self) -> tuple[str, ...] | None:
        return getattr(self.inner, "cameras", None)

    def __call__(self, env: Any) -> StepPolicy:
        return AblatedPolicy(self.inner(env), self.mode, dict(self.instructions))


# One per process: the simulator and policy a worker built in ``_init_worker`` and reuses for its chains.
_WORKER: dict[str, Any] = {}


def _init_worker(factory: Any, sim_cfg: Any, max_steps: int) -> None:
    # One intra-op thread per worker: the workers are the parallelism, and a fixed thread count keeps the
    # floating-point reduction order, hence every action, the same for any number of workers.
    torch.set_num_threads(1)
    env = make_env(sim_cfg, render=bool(factory.needs_images), cameras=getattr(factory, "cameras", None))
    _WORKER.update(env=env, policy=factory(env), max_steps=max_steps, get_task=task_lookup(env))


def _run_one(chain: Chain) -> ChainResult:
    seed, names = chain
    return run_chain(_WORKER["env"], _WORKER["policy"], seed, names, _WORKER["get_task"], _WORKER["max_steps"])


def _chain_name(chain: Chain) -> str:
    seed, names = chain
    return f"chain of seed {seed} ({' > '.join(names)})"


def _close_worker() -> None:
    env = _WORKER.pop("env", None)
    if env is not None:
        env.close()
    _WORKER.clear()


def run_chains(
    factory: Any,
    sim_cfg: SimConfig | Any,
    chains: list[Chain],
    max_steps: int,
    num_workers: int | None = None,
    desc: str = "evaluate chains",
    compute: ComputeConfig | None = None,
) -> list[ChainResult]:
    """Every chain with ``factory``'s policy, on ``num_workers`` processes (0/None: one per core), in the
    simulator ``sim_cfg`` configures (``eval.env.make_env``: the tabletop's ``sim`` or ``eval.calvin``).

    The simulator renders only when ``factory.needs_images``. Workers fork, as collect's do, unless the
    policy runs on CUDA (a forked child cannot use the parent's CUDA context): then they spawn.
    """
    device = str(getattr(factory, "device", "cpu"))
    if compute is not None and compute.executor == "ray" and device.startswith("cuda"):
        raise VlaopsError(
            f"eval.device={device} with compute.executor=ray: not supported yet (the Ray actors ask for "
            "no GPU); set eval.device=cpu, or compute.executor=local"
        )
    threads = torch.get_num_threads()
    try:
        return map_ordered(
            _run_one,
            chains,
            num_workers,
            initializer=_init_worker,
            initargs=(factory, sim_cfg, max_steps),
            method=start_method(device.startswith("cuda")),
            desc=desc,
            unit="chain",
            compute=compute,
            label=_chain_name,
        )
    finally:  # one worker ran in this process: close its simulator, give the threads back
        _close_worker()
        torch.set_num_threads(threads)
