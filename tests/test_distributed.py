"""Training launched as several processes (torchrun / accelerate launch): each batch is sharded across
the processes, the main one alone opens the MLflow run, writes checkpoints and exports, and the result
is the one-process training of the same effective batch. Two CPU processes over gloo, for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import CONF, SHRINK_MODEL, path_overrides
from safetensors.torch import load_file

import vlaops

SRC = Path(vlaops.__file__).resolve().parents[1]
STEPS = [
    "train.max_steps=4",
    "train.save_every=2",
    "train.val_every=2",
    "train.val_batches=1",
    "train.log_every=2",
    # SGD: the step is linear in the gradient, so what the test compares is which samples each step saw
    # (Adam's per-weight normalisation would blow up the float-order differences of tiny gradients)
    "train.optimizer=sgd",
    "train.momentum=0.0",
    "train.learning_rate=0.05",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _train(tmp_path: Path, calvin_dir: Path, name: str, launcher: list[str], *extra: str) -> Path:
    out = tmp_path / name
    cmd = [
        *launcher,
        "-m",
        "vlaops.cli",
        "train",
        "--config-dir",
        str(CONF),
        *path_overrides(out),
        f"data.calvin_dir={calvin_dir}",
        f"data.normalized_dir={calvin_dir.parent / 'normalized'}",
        *SHRINK_MODEL,
        *STEPS,
        "train.batch_size=2",
        *extra,
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow  # two trainings in subprocesses, one of them two processes: about a minute on 2 cores
def test_two_processes_train_like_one_with_the_same_effective_batch(calvin_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _train(tmp_path, calvin_dir, "two", torchrun)
    # the same effective batch in one process: two accumulated batches of 2 per optimizer step, each loss a
    # mean over its own batch as each process's is (a single batch of 4 would weigh masked steps differently)
    one = _train(tmp_path, calvin_dir, "one", [sys.executable], "train.gradient_accumulation_steps=2")

    # one MLflow run, written by the main process only, with its metrics logged once per step
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{two}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [2, 4]
    assert sorted(p.name for p in (two / "models" / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_0000002",
        "step_0000004",
    ]

    # each process took one of the two batches of every step: the same samples, the same mean of means, so
    # the weights match up to float summation order. "Close" is measured against a run that differs only
    # in its data: one process on single batches of 2 (half the samples of each step)
    two_w = load_file(two / "models" / "policy" / "model.safetensors")
    one_w = load_file(one / "models" / "policy" / "model.safetensors")
    half_w = load_file(
        _train(tmp_path, calvin_dir, "half", [sys.executable]) / "models" / "policy" / "model.safetensors"
    )
    assert two_w.keys() == one_w.keys() == half_w.keys()

    def distance(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
        return sum((x[k] - y[k]).float().pow(2).sum().item() for k in x) ** 0.5

    same_batch, other_data = distance(two_w, one_w), distance(half_w, one_w)
    assert same_batch < 0.01 * other_data, (same_batch, other_data)


@pytest.mark.slow  # three launches of two processes: about three minutes on 2 busy cores
def test_lora_gradient_checkpointing_and_bf16_under_ddp_resume_exactly_and_export(calvin_dir, tmp_path):
    """The shipped conf/accelerate/ddp.yaml (two processes; gloo here, NCCL on GPUs), bf16 as it asks, LoRA
    with the vision tower frozen, Kosmos-2's gradient checkpointing: the checkpoints hold the trainable
    tensors only, a run resumed from the step-2 one ends on the same bits as the uninterrupted run, and
    vlaops export writes the same policy from the last checkpoint (LoRA dropout on: its masks must be the
    same after the resume)."""
    from vlaops.utils.bf16 import cpu_bf16_autocast_works

    if not torch.cuda.is_available() and not cpu_bf16_autocast_works():
        pytest.skip("this CPU runs no bf16 autocast: precision=bf16 stops with one line (tests/test_train.py)")
    config = Path(CONF) / "accelerate" / "ddp.yaml"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
    ]
    combo = [
        "experiment=lora",
        "train.train_setup.train_vision=false",
        "train.train_setup.gradient_checkpointing=true",
        "train.train_setup.precision=bf16",
        "train.keep_checkpoints=2",
    ]
    whole = _train(tmp_path, calvin_dir, "ddp", launch, *combo)
    policy = load_file(whole / "models" / "policy" / "model.safetensors")
    ckpts = whole / "models" / "checkpoints"
    saved = load_file(ckpts / "step_0000004" / "model.safetensors")
    assert any("lora_" in k for k in saved) and len(saved) < len(policy) / 2
    assert not any(".vision_model." in k for k in saved)

    # export the last checkpoint: the policy the run itself exported
    from vlaops.cli import main

    assert main(["export", str(ckpts), str(tmp_path / "exported"), "--config-dir", str(CONF)]) == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == policy.keys() and all(torch.equal(exported[k], policy[k]) for k in policy)

    # as if killed after step 2: its later checkpoint and export gone, the same command resumes
    import shutil

    shutil.rmtree(ckpts / "step_0000004")
    shutil.rmtree(whole / "models" / "policy")
    _train(tmp_path, calvin_dir, "ddp", launch, *combo)
    resumed = load_file(whole / "models" / "policy" / "model.safetensors")
    different = [k for k in policy if not torch.equal(policy[k], resumed[k])]
    assert not different, f"{len(different)} of {len(policy)} tensors differ, e.g. {different[:3]}"
