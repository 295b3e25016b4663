"""The figures people look at, as PNG files: DVC image plots (``dvc plots show`` needs no network, where
its Vega pages load their scripts from a CDN) and the same files as MLflow artifacts.

Figures are drawn on matplotlib's ``Figure`` directly (no pyplot: no global state, no display), from the
numbers the stages already write, and saved atomically. One file per figure, named in ``TRAIN_PLOTS``
and ``EVAL_PLOTS``; dvc.yaml declares the same names (tests/test_plots.py checks it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlaops.utils.atomic import atomic_file

PLOTS_DIR = "plots"  # under paths.reports_dir
LOSS, LEARNING_RATE = "loss.png", "learning_rate.png"
SR_BY_LENGTH, TASK_SUCCESS, TRAJECTORIES = "sr_by_chain_length.png", "task_success.png", "action_trajectories.png"
TRAIN_PLOTS = (LOSS, LEARNING_RATE)
EVAL_PLOTS = (SR_BY_LENGTH, TASK_SUCCESS, TRAJECTORIES)
DPI = 100


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure  # imported lazily: matplotlib takes a second to import

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """PNG, atomically; no timestamp in the file, so the same numbers give the same bytes."""
    target = Path(path)
    with atomic_file(target, "wb") as handle:
        fig.savefig(handle, format="png", metadata={"Software": None})
    return target


def loss_curves(curve: Mapping[int, Mapping[str, float]], train_key: str, val_key: str) -> Any:
    """Training and validation loss against the step (log scale when the loss spans a decade)."""
    fig = _figure()
    ax = fig.subplots()
    for key, label, style in ((train_key, "train", "-"), (val_key, "validation", "o-")):
        steps = [s for s in sorted(curve) if key in curve[s]]
        if steps:
            ax.plot(steps, [curve[s][key] for s in steps], style, label=label, markersize=4)
    values = [v for row in curve.values() for k, v in row.items() if k in (train_key, val_key) and v > 0]
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def learning_rate(curve: Mapping[int, Mapping[str, float]], key: str) -> Any:
    fig = _figure(6.4, 3.0)
    ax = fig.subplots()
    steps = [s for s in sorted(curve) if key in curve[s]]
    ax.plot(steps, [curve[s][key] for s in steps], color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    return fig


def sr_by_chain_length(figures: Mapping[str, Mapping[str, Any]], chain_length: int, confidence: float) -> Any:
    """SR_1..SR_n of each evaluated policy (the policy, ablations, references) with its confidence interval."""
    fig = _figure(7.0, 4.0)
    ax = fig.subplots()
    xs = np.arange(1, chain_length + 1)
    width = 0.8 / max(len(figures), 1)
    for i, (label, figs) in enumerate(figures.items()):
        sr = np.array([figs[f"sr_{k}"] for k in xs])
        ci = np.array([figs[f"sr_{k}_ci"] for k in xs])  # (n, 2) low, high
        err = np.stack([sr - ci[:, 0], ci[:, 1] - sr]).clip(min=0)
        ax.bar(
            xs + (i - (len(figures) - 1) / 2) * width,
            sr,
            width,
            yerr=err,
            capsize=3,
            label=f"{label} (Avg. Len {figs['avg_len']:.2f})",
        )
    ax.set(
        xlabel="tasks completed in a row",
        ylabel="success rate",
        ylim=(0, 1.05),
        xticks=xs,
        title=f"Success rate by chain length ({confidence:.0%} interval)",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def task_success(task_info: Mapping[str, Mapping[str, int]]) -> Any:
    """Per-task success rate of the policy, with the number of attempts on each bar."""
    names = sorted(task_info)
    fig = _figure(7.0, max(2.5, 0.35 * len(names) + 1.2))
    ax = fig.subplots()
    rates = [task_info[t]["success"] / task_info[t]["total"] if task_info[t]["total"] else 0.0 for t in names]
    bars = ax.barh(names, rates, color="tab:blue")
    for bar, t in zip(bars, names):
        ax.annotate(
            f"{task_info[t]['success']}/{task_info[t]['total']}",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set(xlabel="success rate", xlim=(0, 1.1), title="Per-task success (policy)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return fig


def action_trajectories(episodes: Sequence[Mapping[str, Any]], dim_names: Sequence[str]) -> Any:
    """Predicted (dashed) against recorded (solid) actions over a few validation episodes, one panel per
    action dimension; each episode ``{"label": str, "predicted": (T, A), "recorded": (T, A)}``."""
    n = len(dim_names)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 2.4 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colors = [f"C{i}" for i in range(10)]
    for d, (ax, name) in enumerate(zip(axes, dim_names)):
        for e, ep in enumerate(episodes):
            color = colors[e % len(colors)]
            ax.plot(
                np.asarray(ep["recorded"])[:, d], "-", color=color, linewidth=1.2, label=ep["label"] if d == 0 else None
            )
            ax.plot(np.asarray(ep["predicted"])[:, d], "--", color=color, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("Validation episodes: recorded (solid) vs predicted (dashed), normalised actions", fontsize=10)
    if episodes:
        fig.legend(loc="outside lower center", ncol=min(len(episodes), 4), fontsize=8)
    return fig


def not_evaluated(title: str, reason: str) -> Any:
    """A figure that says why there is nothing to draw (a mobile base's policy has no closed-loop chains)."""
    fig = _figure(6.4, 2.0)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=9)
    return fig
