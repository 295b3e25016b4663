"""The pipeline's reliability guarantees, each proved on real processes: a train killed with SIGKILL
resumes to the same bits; SIGTERM/SIGINT end a stage like an error; stale temporaries are swept;
concurrent runs are safe."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import CONF, SHRINK_MODEL, SHRINK_PIPELINE, path_overrides
from numpy.lib import format as npy_format
from safetensors.torch import load_file

import vlaops
from vlaops import cli, tracking
from vlaops.errors import Terminated
from vlaops.io import calvin
from vlaops.tracking import TRAIN_LOSS
from vlaops.utils import signals

SRC = Path(vlaops.__file__).resolve().parents[1]  # the children run the code under test


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def stage_cmd(stage: str, tmp_path: Path, *extra: str) -> list[str]:
    """``python -m vlaops.cli <stage>`` on the shrunk config with every path in ``tmp_path``."""
    return [
        sys.executable,
        "-m",
        "vlaops.cli",
        stage,
        "--config-dir",
        str(CONF),
        *path_overrides(tmp_path),
        *SHRINK_MODEL,
        *SHRINK_PIPELINE,
        *extra,
    ]


def _default_sigint() -> None:
    """A child of a background shell job starts with SIGINT ignored (and Python then never raises
    KeyboardInterrupt); give it the terminal's default, as a user's Ctrl-C meets it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_stage(stage: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        stage_cmd(stage, tmp_path, *extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
        preexec_fn=_default_sigint,
    )


def start_and_signal(
    cmd: list[str], ready: callable, sig: int, timeout: float = 900, meanwhile: callable = None
) -> subprocess.CompletedProcess:
    """Start ``cmd``, send it ``sig`` as soon as ``ready(pid)`` is true (after ``meanwhile(pid)``, if given),
    wait for it to end. ``ready`` is a point of the stage's progress (a file written, workers started), never
    a time: under load the same time lands at another point."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready(proc.pid):
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the process ended (rc {proc.returncode}) before the signal point:\n{err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the signal point was never reached")
            time.sleep(0.005)
        if meanwhile is not None:
            meanwhile(proc.pid)
            assert proc.poll() is None, "the process ended while the test was busy; make it run longer"
        while sig != signal.SIGKILL and not _catches(proc.pid, sig):  # under load the imports take seconds
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the process never installed its {signal.Signals(sig).name} handler")
            time.sleep(0.005)
        children = _children(proc.pid)  # e.g. a stage's worker pool: it must not outlive the stage, even SIGKILLed
        proc.send_signal(sig)
        proc.wait(timeout=900)  # a hang guard: on loaded cores a stage finishing its step takes minutes
        deadline_children = time.monotonic() + 30
        while (alive := [c for c in children if _alive(c)]) and time.monotonic() < deadline_children:
            time.sleep(0.1)
        assert not alive, f"worker processes {alive} outlived the {signal.Signals(sig).name}-ed stage"
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: the SigCgt mask in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc: assume it does, as before
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def _runs(db: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# ---- exact resume ------------------------------------------------------------------------------------
RESUME = [
    "train.max_steps=12",
    "train.save_every=4",
    "train.log_every=2",
    "train.val_every=4",
    "train.keep_checkpoints=2",
]


def _outputs(root: Path, name: str) -> list[str]:
    return [
        f"paths.model_dir={root}/{name}/policy",
        f"paths.checkpoint_dir={root}/{name}/checkpoints",
        f"paths.reports_dir={root}/{name}/reports",
        f"tracking.uri=sqlite:///{root}/{name}/mlflow.db",
    ]


@pytest.mark.slow  # three trainings in subprocesses: about a minute on 2 busy cores
def test_a_train_killed_after_a_checkpoint_resumes_to_the_same_bits(calvin_dir, tmp_path):
    """Uninterrupted 12 steps == 12 steps SIGKILLed right after its first checkpoint, then rerun: every
    tensor equal (torch.equal), one MLflow run FINISHED, the curve file the same bytes. Augmentation is
    on (the default config) and the kill lands mid-epoch, with a batch already prefetched."""
    whole = run_stage("train", tmp_path, *RESUME, *_outputs(tmp_path, "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    ckpts = tmp_path / "killed" / "checkpoints"
    killed = start_and_signal(
        stage_cmd("train", tmp_path, *RESUME, *_outputs(tmp_path, "killed")),
        lambda pid: ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()),
        signal.SIGKILL,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "policy").exists(), "the kill came after the end; the test proves nothing"
    (run,) = _runs(tmp_path / "killed" / "mlflow.db")
    assert run.info.status == "RUNNING"  # SIGKILL: nothing could close it

    resumed = run_stage("train", tmp_path, *RESUME, *_outputs(tmp_path, "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a = load_file(str(tmp_path / "whole" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 50
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"

    # the same MLflow run continued to the end, and the same curve file, row for row
    (run,) = _runs(tmp_path / "killed" / "mlflow.db")
    assert run.info.status == "FINISHED" and run.info.run_id == resumed_run_id(tmp_path / "killed" / "policy")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/killed/mlflow.db")
    assert {m.step for m in client.get_metric_history(run.info.run_id, TRAIN_LOSS)} == set(range(2, 13, 2))
    curve = (tmp_path / "killed" / "reports" / "train_curve.csv").read_bytes()
    assert curve == (tmp_path / "whole" / "reports" / "train_curve.csv").read_bytes()
    assert [int(r["step"]) for r in csv.DictReader(curve.decode().splitlines())] == list(range(2, 13, 2))


def resumed_run_id(policy_dir: Path) -> str:
    import json

    return json.loads((policy_dir / "mlflow_run.json").read_text())["run_id"]


# ---- clean kills -------------------------------------------------------------------------------------
def _temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if ".tmp" in p.name)


def _one_line_error(stderr: str, text: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    assert text in stderr.strip().splitlines()[-1], stderr[-3000:]


LONG_TRAIN = ["train.max_steps=2000", "train.save_every=2", "train.val_every=2000"]


@pytest.mark.slow  # a training (and, for SIGTERM, a second one) in subprocesses
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_train_ends_killed_without_leftovers(calvin_dir, tmp_path, sig):
    """SIGTERM/SIGINT after a checkpoint: exit 128+signal with one line, the MLflow run KILLED, no
    temporaries, no export; the checkpoints stay (a rerun resumes from them). While it runs, a second
    trainer on its checkpoint directory is refused with one line naming the holder."""
    ckpts = tmp_path / "models" / "checkpoints"

    def second_trainer(pid: int) -> None:
        second = run_stage("train", tmp_path, *LONG_TRAIN, f"paths.model_dir={tmp_path}/second")
        assert second.returncode == 1
        _one_line_error(second.stderr, f"models/checkpoints: in use by another trainer (pid {pid} on ")

    done = start_and_signal(
        stage_cmd("train", tmp_path, *LONG_TRAIN),
        lambda pid: ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()),
        sig,
        meanwhile=second_trainer if sig == signal.SIGTERM else None,
    )
    assert done.returncode == 128 + sig, done.stderr[-3000:]
    _one_line_error(done.stderr, f"stopped by {signal.Signals(sig).name}")
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"
    assert _temps(tmp_path / "models") == [] and not (tmp_path / "models" / "policy").exists()
    assert any(p.name.startswith("step_") for p in ckpts.iterdir())


class _CleanupFails:
    """A library's context manager whose cleanup raises over the exception passing through it, as
    OmegaConf's flag_override did when a SIGTERM landed while it built a node (CI, stop 17: the stage
    ended with exit 1, a traceback and the MLflow run FAILED)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")


@pytest.mark.slow  # seconds: the full suite only (the quick loop stays under 5 minutes)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_hidden_under_a_library_error_still_ends_the_stage_killed(tmp_path, monkeypatch, capsys, sig):
    """In process, so the signal lands exactly inside the library: exit 128+signal with one line, run KILLED."""
    monkeypatch.setattr(signals, "_pending", None)  # the handler records the signal process-wide

    def stage(command: str, cfg) -> None:
        with tracking.run(cfg.tracking), _CleanupFails():
            os.kill(os.getpid(), sig)  # the handler raises at the next bytecode, inside the library's block
            time.sleep(60)

    monkeypatch.setattr(cli, "run_stage", stage)
    assert cli.main(["train", "--config-dir", str(CONF), *path_overrides(tmp_path)]) == 128 + sig
    _one_line_error(capsys.readouterr().err, f"stopped by {signal.Signals(sig).name}")
    (run,) = _runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _convert_started(out: Path):
    return lambda pid: any(out.parent.glob(f".{out.name}.tmp-*/training/episode_*.npz"))


@pytest.mark.slow  # both signals: the full suite only (the quick loop stays under 5 minutes)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_convert_keeps_the_old_output_and_no_temporary(calvin_dir, tmp_path, sig):
    before = _tree(calvin_dir)
    done = start_and_signal(stage_cmd("convert", tmp_path), _convert_started(calvin_dir), sig)
    assert done.returncode == 128 + sig, done.stderr[-3000:]
    _one_line_error(done.stderr, f"stopped by {signal.Signals(sig).name}")
    assert _tree(calvin_dir) == before  # the previous complete output, untouched
    assert _temps(calvin_dir.parent) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_frame_write_is_honoured_once_the_file_is_whole(tmp_path, monkeypatch, sig):
    """In process, so the signal lands inside numpy's zip writer, where the subprocess test above lands it
    only now and then (it then printed a ZipFile traceback under the one-line stop): the frame is written
    whole, then the signal unwinds as the CLI's handler raises it."""
    monkeypatch.setattr(signals, "_pending", None)  # the handler records the signal process-wide
    real = npy_format.write_array

    def signal_then_write(*args, **kwargs):
        os.kill(os.getpid(), sig)  # the handler runs at the next bytecode: here, with the zip member open
        return real(*args, **kwargs)

    monkeypatch.setattr(npy_format, "write_array", signal_then_write)
    previous = {s: signal.signal(s, cli._raise_signalled) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else Terminated):
            calvin.write_frame(tmp_path, 0, {"actions": np.arange(7.0), "rgb_gripper": np.ones((4, 4, 3), np.uint8)})
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    with np.load(calvin.frame_path(tmp_path, 0)) as frame:
        assert frame["actions"].tolist() == list(range(7)) and frame["rgb_gripper"].shape == (4, 4, 3)


@pytest.mark.slow  # two converts in subprocesses: 20-50 s on 2 busy cores
def test_after_sigkill_the_rerun_sweeps_the_stale_temporary_and_matches_a_clean_run(calvin_dir, tmp_path):
    out = tmp_path / "calvin_killed"
    killed = start_and_signal(
        stage_cmd("convert", tmp_path, f"data.calvin_dir={out}"), _convert_started(out), signal.SIGKILL
    )
    assert killed.returncode == -signal.SIGKILL
    (stale,) = _temps(tmp_path)  # SIGKILL: nothing could clean up
    assert not out.exists()
    rerun = run_stage("convert", tmp_path, f"data.calvin_dir={out}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"removed {stale}" in rerun.stderr and "left by an interrupted run" in rerun.stderr
    assert _temps(tmp_path) == []
    assert _tree(out) == _tree(calvin_dir)  # byte for byte what an uninterrupted convert wrote


def _ingest_started(out: Path):
    return lambda pid: any(out.parent.glob(f".{out.name}.tmp-*/*"))


@pytest.fixture
def many_bags(tmp_path: Path) -> Path:
    """Enough recordings that ingest runs for seconds: a signal lands while it writes its temporary."""
    from bagfactory import write_arm_bag

    raw = tmp_path / "many_raw"
    for i in range(16):
        write_arm_bag(
            raw / f"ep{i:02d}",
            n_frames=60,
            static_size=128,
            seed=i,
            instruction="push the red block to the left" if i % 2 else "lift the blue block",
        )
    return raw


@pytest.mark.slow  # three ingests of 16 recordings in subprocesses
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_ingest_keeps_the_old_output_and_the_rerun_matches_a_clean_run(many_bags, tmp_path, sig):
    """Killed while it writes: the previous complete episodes stay untouched, exit 128+signal with one
    line (SIGTERM) and no temporary; after SIGKILL the rerun sweeps the stale temporary. Either way the
    rerun's episodes are byte-identical to an uninterrupted ingest's."""
    out = tmp_path / "episodes"
    raw = f"data.raw_dir={many_bags}"
    first = run_stage("ingest", tmp_path, raw, f"data.episodes_dir={tmp_path}/clean")
    assert first.returncode == 0, first.stderr[-3000:]
    clean = _tree(tmp_path / "clean")
    import shutil

    shutil.copytree(many_bags / "ep00", tmp_path / "one_raw" / "ep00")
    old = run_stage("ingest", tmp_path, f"data.raw_dir={tmp_path}/one_raw")  # an older, smaller output at `out`
    assert old.returncode == 0, old.stderr[-3000:]
    before = _tree(out)
    killed = start_and_signal(stage_cmd("ingest", tmp_path, raw), _ingest_started(out), sig)
    assert _tree(out) == before  # the previous complete output, untouched
    if sig == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL
        (stale,) = [p for p in _temps(tmp_path) if p.parent == tmp_path]  # (and whatever it held)
    else:
        assert killed.returncode == 128 + sig, killed.stderr[-3000:]
        _one_line_error(killed.stderr, f"stopped by {signal.Signals(sig).name}")
        assert _temps(tmp_path) == []
    rerun = run_stage("ingest", tmp_path, raw)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if sig == signal.SIGKILL:
        assert f"removed {stale}" in rerun.stderr
    assert _temps(tmp_path) == []
    assert _tree(out) == clean


# two chain workers, so that the chains running is a thing the test can see: the stage's worker processes
EVAL_LONG = [
    "eval.num_chains=4",
    "eval.max_steps_per_subtask=40",
    "eval.ablations=[]",
    "eval.references=[expert]",
    "eval.num_workers=2",
]


def _chains_running(pid: int) -> bool:
    """The evaluate stage ``pid`` is playing chains: its two chain workers are running (nothing else it does
    before them starts two processes; under spawn a resource tracker is at most one)."""
    return len(_children(pid)) >= 2


@pytest.mark.slow  # a training and three evaluations in subprocesses
def test_a_killed_evaluate_keeps_the_old_reports_and_no_run_left_running(calvin_dir, tmp_path):
    """SIGTERM while the chains run: exit 143 with one line, the previous reports untouched, no
    temporary, no MLflow run left RUNNING. SIGKILL later on: the rerun's reports are byte-identical to
    the first evaluation's (same seed, same checkpoint)."""
    trained = run_stage("train", tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    first = run_stage("evaluate", tmp_path, *EVAL_LONG)
    assert first.returncode == 0, first.stderr[-3000:]
    reports = tmp_path / "reports"
    names = ("metrics.json", "results.json", "chains.json")
    before = {n: (reports / n).read_bytes() for n in names}
    # past the imports and the offline metrics, into the chains
    term = start_and_signal(stage_cmd("evaluate", tmp_path, *EVAL_LONG), _chains_running, signal.SIGTERM)
    assert term.returncode == 128 + signal.SIGTERM, term.stderr[-3000:]
    _one_line_error(term.stderr, "stopped by SIGTERM")
    assert {n: (reports / n).read_bytes() for n in names} == before
    assert _temps(tmp_path) == []
    assert all(r.info.status != "RUNNING" for r in _runs(tmp_path / "mlflow.db"))
    killed = start_and_signal(stage_cmd("evaluate", tmp_path, *EVAL_LONG), _chains_running, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert {n: (reports / n).read_bytes() for n in names} == before
    rerun = run_stage("evaluate", tmp_path, *EVAL_LONG)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _temps(tmp_path) == []
    assert {n: (reports / n).read_bytes() for n in names} == before
    assert all(r.info.status != "RUNNING" for r in _runs(tmp_path / "mlflow.db"))


# ---- concurrency -------------------------------------------------------------------------------------
@pytest.mark.slow  # two trainings in subprocesses
def test_two_trainings_starting_together_on_a_fresh_store_both_finish(calvin_dir, tmp_path):
    """MLflow creates the sqlite schema on first use; two processes doing it at once raced
    (``duplicate column name: step``). Both start at the same instant here; both must finish."""
    store = f"tracking.uri=sqlite:///{tmp_path}/shared/mlflow.db"
    procs = [
        subprocess.Popen(
            stage_cmd("train", tmp_path, "train.max_steps=2", *_outputs(tmp_path, name), store),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    runs = _runs(tmp_path / "shared" / "mlflow.db")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
