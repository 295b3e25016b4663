"""Which chains the evaluate stage plays, in which simulator: the tabletop's seeded chains or CALVIN's own.

``eval.env=tabletop`` (the default): ``eval.num_chains`` chains sampled from ``eval.seed`` over
``eval.tasks`` (or every task of ``sim.tasks``) in the embedded simulator, ``eval.max_steps_per_subtask``
steps per subtask. ``eval.env=calvin``: the first ``eval.num_chains`` of CALVIN's 1000 evaluation
sequences in calvin_env's scene (``eval.calvin``), each chain named by its sequence index and started from
CALVIN's initial scene for it, CALVIN's instructions, ``eval.calvin.max_steps_per_subtask`` (360) steps.
Everything that can be refused is refused here, in one line, before a chain is played.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlaops.errors import VlaopsError
from vlaops.eval.config import EvalConfig
from vlaops.model.config import ModelConfig
from vlaops.sim.config import SimConfig


@dataclass(frozen=True)
class ChainPlan:
    env_cfg: Any  # what eval.env.make_env builds: a SimConfig or an eval.calvin CalvinConfig
    chains: list[tuple[int, list[str]]]  # (scene seed or CALVIN sequence index, task names)
    instructions: dict[str, str]  # {task name: instruction} of every task the chains name
    max_steps: int  # per subtask


def check_policy(eval_cfg: EvalConfig, model_dir: Path, policy_cfg: ModelConfig) -> None:
    """Under eval.env=calvin, a policy that does not emit CALVIN's 7-value relative arm action is refused."""
    if eval_cfg.env != "calvin":
        return
    if policy_cfg.action_classes or policy_cfg.action_dim != 7:
        raise VlaopsError(
            f"{model_dir}: eval.env=calvin drives CALVIN's Panda arm with 7-value relative actions, but this "
            f"policy's action space is action_dim={policy_cfg.action_dim}, action_classes={policy_cfg.action_classes} "
            "(a mobile base); evaluate it with eval.env=tabletop (offline metrics) instead"
        )


def plan_chains(eval_cfg: EvalConfig, sim_cfg: SimConfig) -> ChainPlan:
    """The chains ``eval_cfg`` asks for, in the simulator it names, checked."""
    if eval_cfg.env == "calvin":
        from vlaops.sim.calvin.env import chain_list, check_sequences
        from vlaops.sim.calvin.instructions import instructions

        chains = chain_list(eval_cfg.num_chains)
        check_sequences(eval_cfg.calvin, chains)
        names = sorted({name for _, tasks in chains for name in tasks})
        return ChainPlan(
            eval_cfg.calvin, chains, {n: instructions()[n] for n in names}, eval_cfg.calvin.max_steps_per_subtask
        )
    return tabletop_chains(sim_cfg, eval_cfg)


def tabletop_chains(cfg: SimConfig, eval_cfg: EvalConfig) -> ChainPlan:
    """``eval.num_chains`` chains seeded by ``eval.seed`` over ``eval.tasks`` (or ``cfg.tasks``) in the tabletop."""
    from vlaops.sim import TabletopEnv, get_task, seeded_chains

    tasks = list(eval_cfg.tasks or cfg.tasks)
    for name in tasks:
        try:
            get_task(name)
        except ValueError as exc:
            raise VlaopsError(f"eval.tasks: {exc}") from None
    with TabletopEnv(cfg, render=False) as env:  # the sampler reads the state only
        try:
            chains = seeded_chains(env, tasks, eval_cfg.num_chains, eval_cfg.chain_length, eval_cfg.seed)
        except ValueError as exc:
            raise VlaopsError(f"eval.chain_length={eval_cfg.chain_length}: {exc}") from None
    return ChainPlan(cfg, chains, {n: get_task(n).instruction for n in tasks}, eval_cfg.max_steps_per_subtask)
