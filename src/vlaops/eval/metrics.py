"""The schema of ``reports/metrics.json`` and of an evaluation's MLflow metrics, in one place.

Every policy an evaluation plays has one label, used unchanged in the log lines, as the key of its
figures in metrics.json and as the prefix of its MLflow metrics: ``policy`` for the trained one,
``ablation/<mode>`` for each of ``eval.ablations`` and ``reference/<name>`` for each of
``eval.references``. metrics.json holds the policy's figures under CALVIN's bare names (``avg_len``,
``sr_1``, ``avg_len_ci`` ...) and every other label's under the label (``"ablation/blank_images":
{"avg_len": ...}``); MLflow names them ``eval/avg_len`` and ``ablation/blank_images/avg_len``, an
interval as two metrics (``..._ci_low``, ``..._ci_high``), since a metric is one number.
"""

from __future__ import annotations

from typing import Any

from vlaops import tracking
from vlaops.eval.chains import start_sr

POLICY = "policy"  # the label of the trained policy itself
MOBILE_BASE = "mobile_base"  # metrics.json's embodiment when no chain could be played


def ablation_label(mode: str) -> str:
    return f"{tracking.ABLATION_PREFIX}{mode}"


def reference_label(name: str) -> str:
    return f"{tracking.REFERENCE_PREFIX}{name}"


def policy_metrics(
    figs: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    chain_length: int,
    confidence: float,
    offline: dict[str, float],
    executed: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json of a closed-loop evaluation: ``figs`` is {label: ``eval.chains.figures`` of its run},
    ``summary`` the policy's ``eval.chains.summarize``, ``executed`` how its chunks ran
    (``Execution.describe``)."""
    return {
        **figs[POLICY],
        "num_chains": summary["num_chains"],
        "chain_length": chain_length,
        "confidence": confidence,
        "execute": executed,  # how the policy's chunks ran (its ablations' too): mode, chunk_steps, ensemble_coeff
        "task_sr": {t: v["success"] / v["total"] for t, v in summary["task_info"].items()},
        "subtask_sr": start_sr(summary),  # first: from the reset scene; later: where the previous subtask left it
        "offline": offline,
        **{label: fig for label, fig in figs.items() if label != POLICY},
    }


def offline_only_metrics(offline: dict[str, float], closed_loop: str) -> dict[str, Any]:
    """metrics.json of a policy the simulator cannot play (a mobile base's): the offline figures and why
    there are no others."""
    return {"embodiment": MOBILE_BASE, "closed_loop": closed_loop, "offline": offline}


def flat_figures(prefix: str, fig: dict[str, Any]) -> dict[str, float]:
    """MLflow names of one run's figures: <prefix>avg_len, <prefix>sr_1, <prefix>avg_len_ci_low ..."""
    out: dict[str, float] = {}
    for key, value in fig.items():
        if key.endswith(tracking.CI_SUFFIX):
            base = key[: -len(tracking.CI_SUFFIX)]
            out[f"{prefix}{base}{tracking.CI_LOW}"], out[f"{prefix}{base}{tracking.CI_HIGH}"] = value
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def mlflow_metrics(
    figs: dict[str, dict[str, Any]], metrics: dict[str, Any], times: dict[str, float]
) -> dict[str, float]:
    """Every number of a closed-loop evaluation under its MLflow name: each label's figures, the per-task
    and per-start success rates, the offline errors and each label's wall time."""
    flat: dict[str, float] = {}
    for label, fig in figs.items():
        flat.update(flat_figures(tracking.figure_prefix(label), fig))
    flat.update({f"{tracking.TASK_SR_PREFIX}{t}": v for t, v in metrics["task_sr"].items()})
    flat.update({f"{tracking.SUBTASK_SR_PREFIX}{k}": v for k, v in metrics["subtask_sr"].items() if v is not None})
    flat.update(offline_mlflow_metrics(metrics["offline"]))
    flat.update({f"{tracking.EVAL_TIME_PREFIX}{label}": t for label, t in times.items()})
    return flat


def offline_mlflow_metrics(offline: dict[str, float]) -> dict[str, float]:
    return {f"{tracking.OFFLINE_PREFIX}{k}": v for k, v in offline.items()}


def headline(fig: dict[str, Any]) -> dict[str, Any]:
    """The policy's Avg. Len and SR_1..SR_n, formatted as the registered model versions are tagged."""
    kept = {k: v for k, v in fig.items() if k == tracking.AVG_LEN or k.startswith(tracking.SR_PREFIX)}
    return {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in kept.items()}
