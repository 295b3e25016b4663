"""evaluate: models/policy -> CALVIN-style chain success in the simulator + offline action error.

Writes reports/metrics.json (a DVC metric) and CALVIN's reports/results.json, and logs both onto
the MLflow run that trained the policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlaops import tracking
from vlaops.config import Config
from vlaops.data.dataset import make_window_dataset
from vlaops.data.normalization import ActionNormalizer
from vlaops.errors import VlaopsError
from vlaops.eval.chains import evaluate_chains, results_json, summarize
from vlaops.eval.offline import offline_action_metrics
from vlaops.io.calvin import VALIDATION, CalvinSplit
from vlaops.model import PolicyRuntime
from vlaops.sim import TabletopEnv, get_task, sample_chain
from vlaops.utils.atomic import write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VlaopsError(f"eval.device={name}, but no CUDA device is available")
    return torch.device(name)


def mean_action(normalizer: ActionNormalizer) -> torch.Tensor | None:
    """The training split's mean action, normalised: the constant the offline errors are compared to."""
    if not normalizer.stats:
        return None
    return torch.as_tensor(normalizer.normalize(np.asarray(normalizer.stats["mean"], dtype=np.float32)))


def seeded_chains(env: TabletopEnv, tasks: list[str], num_chains: int, length: int, seed: int) -> list[tuple[int, list[str]]]:
    """(scene seed, task chain) pairs: the same seed gives the same scenes and chains."""
    rng = np.random.default_rng(seed)
    chains = []
    for i in range(num_chains):
        scene_seed = seed + i
        env.reset(scene_seed)
        try:
            chains.append((scene_seed, sample_chain(rng, length, tasks, env.get_info())))
        except ValueError as exc:
            raise VlaopsError(f"eval.chain_length={length}: {exc}") from None
    return chains


def run(cfg: Config) -> None:
    model_dir, reports_dir = Path(cfg.paths.model_dir), Path(cfg.paths.reports_dir)
    device = resolve_device(cfg.eval.device)
    policy = PolicyRuntime.load(model_dir, device)
    tasks = list(cfg.eval.tasks or cfg.sim.tasks)
    for name in tasks:
        try:
            get_task(name)
        except ValueError as exc:
            raise VlaopsError(f"eval.tasks: {exc}") from None

    val_split = CalvinSplit(Path(cfg.data.calvin_dir) / VALIDATION, cfg.data.trust_pickles)
    val_ds = make_window_dataset(val_split, policy.normalizer, policy.processor, policy.cfg, None, cfg.data.cache_dir)
    offline = offline_action_metrics(policy.model, val_ds, cfg.eval.batch_size, cfg.eval.offline_batches, device,
                                     constant=mean_action(policy.normalizer))
    log.info("offline action metrics on %s: %s", val_split.dir, offline)

    with TabletopEnv(cfg.sim) as env:
        chains = seeded_chains(env, tasks, cfg.eval.num_chains, cfg.eval.chain_length, cfg.eval.seed)
        results = evaluate_chains(env, policy, chains, get_task, cfg.eval.max_steps_per_subtask)
    summary = summarize(results, cfg.eval.chain_length)
    metrics: dict[str, Any] = {
        tracking.AVG_LEN: summary["avg_seq_len"],
        **{f"{tracking.SR_PREFIX}{i}": sr for i, sr in summary["chain_sr"].items()},
        "num_chains": summary["num_chains"],
        "chain_length": cfg.eval.chain_length,
        "task_sr": {t: v["success"] / v["total"] for t, v in summary["task_info"].items()},
        "offline": offline,
    }
    write_json(reports_dir / METRICS_FILE, metrics)
    write_json(reports_dir / RESULTS_FILE, results_json(summary, str(model_dir)))
    write_json(reports_dir / "chains.json", [r.__dict__ for r in results])
    log.info("Avg. Len %.3f; SR %s", summary["avg_seq_len"], {i: round(v, 3) for i, v in summary["chain_sr"].items()})

    run_file = model_dir / tracking.RUN_FILE
    run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
    if run_id and cfg.tracking.enabled and not tracking.run_exists(cfg.tracking, run_id):
        log.warning("MLflow run %s of %s is not in %s; logging evaluation to a new run", run_id, model_dir, tracking.tracking_uri(cfg.tracking))
        run_id = None
    with tracking.run(cfg.tracking, run_id=run_id, tags=None if run_id else {"stage": "evaluate"}) as mlflow:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        flat.update({f"{tracking.TASK_SR_PREFIX}{t}": v for t, v in metrics["task_sr"].items()})
        flat.update({f"{tracking.OFFLINE_PREFIX}{k}": v for k, v in offline.items()})
        tracking.log_metrics(mlflow, flat)
        tracking.log_artifact(mlflow, reports_dir / RESULTS_FILE)
        tracking.log_artifact(mlflow, reports_dir / METRICS_FILE)
