"""MLflow helpers: one run per experiment holds config, data fingerprint, curves and evaluation.

train opens the run and records its id beside the exported policy; evaluate re-opens that same
run, so ``mlflow ui`` shows training and evaluation of an experiment on one row.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlaops.errors import VlaopsError
from vlaops.utils.locks import file_lock
from vlaops.utils.logging import get_logger
from vlaops.utils.paths import check_writable
from vlaops.utils.signals import signal_behind

log = get_logger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"  # relative: to the project root (project_root), as any relative store
ARTIFACTS_DIR = "mlartifacts"  # the artifact root of experiments vlaops creates, beside the sqlite store
RUN_FILE = "mlflow_run.json"  # written beside the exported policy

# Metric names: one home, imported by the training loop, the stages and the tests.
TRAIN_LOSS = "train/loss"
TRAIN_ARM_LOSS = "train/arm_loss"
TRAIN_GRIPPER_LOSS = "train/gripper_loss"
TRAIN_AUX_LOSS = "train/aux_loss"  # the auxiliary read-outs (model.aux_weight > 0 only)
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
VAL_LOSS = "val/loss"
VAL_ARM_LOSS = "val/arm_loss"
VAL_GRIPPER_LOSS = "val/gripper_loss"
VAL_AUX_LOSS = "val/aux_loss"
BEST_VAL_LOSS = "best/val_loss"  # a sweep's parent run: the lowest val/loss of its jobs (vlaops.sweep)
SWEEP_VAL_LOSS = "sweep/val_loss"  # ... and each job's, one point per job number
AVG_LEN = "avg_len"
SR_PREFIX = "sr_"  # sr_1 .. sr_5
TASK_SR_PREFIX = "task_sr/"
SUBTASK_SR_PREFIX = "subtask_sr/"  # subtask_sr/first (from the reset scene), subtask_sr/later (after another subtask)
OFFLINE_PREFIX = "offline/"
CI_SUFFIX = "_ci"  # metrics.json: avg_len_ci = [low, high]; MLflow: avg_len_ci_low, avg_len_ci_high
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
ABLATION_PREFIX = "ablation/"  # ablation/blank_images/avg_len, ablation/swap_instruction/sr_1_ci_low ...
REFERENCE_PREFIX = "reference/"  # reference/expert/avg_len, reference/blind/sr_1 ...
EVAL_TIME_PREFIX = "eval_time_s/"  # eval_time_s/policy, eval_time_s/ablation/blank_images ...
HEADLINE_PREFIX = "eval/"  # MLflow: eval/avg_len, eval/sr_1 ... (metrics.json keeps CALVIN's bare names)


def figure_prefix(label: str) -> str:
    """The MLflow name prefix of an evaluated policy's figures: ``eval/`` for the policy itself, its label
    (``ablation/<mode>/``, ``reference/<name>/``) for the others, as in metrics.json and the log."""
    return HEADLINE_PREFIX if label == "policy" else f"{label}/"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = (
        None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; a relative path is the project root's
    )
    experiment_name: str = "vlaops"
    run_name: str | None = None  # None: the DVC experiment's name under `dvc exp run`, else run-<UTC time>
    system_metrics: bool = True  # CPU, memory, disk (and GPU where pynvml sees one) sampled every 10 s into the run
    log_model: bool = True  # the exported policy as an MLflow model (pyfunc) in the train run
    registered_model: str | None = "vlaops-policy"  # and registered under this name; None: not registered


SQLITE = "sqlite:///"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len(SQLITE) :].split("?", 1)[0]) if uri.startswith(SQLITE) else None


def project_root() -> Path:
    """The directory whose MLflow store every run of the project reaches.

    DVC sets ``DVC_ROOT`` for each stage it runs, and for a queued or ``--temp`` experiment (run in a
    copy under ``.dvc/tmp/exps``) it points at the parent repository: so ``dvc repro``, ``dvc exp run
    --queue`` and a plain ``vlaops`` call all log to one store, and no run is lost with a temporary copy.
    Outside DVC: the nearest directory at or above the working directory holding ``dvc.yaml``, else the
    working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / "dvc.yaml").is_file()), cwd)


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config beats the environment, the environment beats the default: one answer, logged once.
    A relative sqlite path is made absolute against :func:`project_root`."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    path, sep, query = uri[len(SQLITE) :].partition("?")
    if uri.startswith(SQLITE) and not Path(path).is_absolute():
        uri = f"{SQLITE}{project_root() / path}{sep}{query}"
    return uri


def artifact_root(cfg: TrackingConfig) -> str | None:
    """Where experiments vlaops creates keep their artifacts: ``mlartifacts/`` beside a sqlite store
    (MLflow's own default, ``./mlruns`` of whatever the working directory is, scatters them); None for
    another store (a server decides)."""
    db = _sqlite_path(tracking_uri(cfg))
    return None if db is None else (db.parent / ARTIFACTS_DIR).as_uri()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def default_run_name() -> str:
    """Under ``dvc exp run`` the experiment's name, so a row reads the same in ``dvc exp show`` and ``mlflow ui``.

    Not MLflow's own generated name: it comes from the ``random`` module, which training seeds, so
    every run would get the same one.
    """
    return os.environ.get("DVC_EXP_NAME") or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())


def dvc_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to, when DVC started it (DVC sets these variables)."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def _mlflow(cfg: TrackingConfig):  # imported lazily: mlflow takes seconds to import
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # the model registry lives in the same store: without this, MLflow keeps whatever registry URI the
    # process set before (another store, in a long-lived process), and registrations would land there
    mlflow.set_registry_uri(uri)
    return mlflow


def check_store(cfg: TrackingConfig) -> None:
    """Fail fast: a sqlite store must be creatable (or an existing writable file); the error names
    ``tracking.uri``. Other stores (a server) are checked when the run opens."""
    db = _sqlite_path(tracking_uri(cfg)) if cfg.enabled else None
    if db is None:
        return
    if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
        raise VlaopsError(f"tracking.uri={tracking_uri(cfg)}: {db} is not a readable and writable file")
    check_writable("tracking.uri", db.parent, tracking_uri(cfg))


@contextlib.contextmanager
def store_setup_lock(cfg: TrackingConfig) -> Iterator[None]:
    """Serialise opening a sqlite store: MLflow creates and migrates the schema on first use, and two
    processes doing that at once fail (``duplicate column name: step``), as do two creating the same
    experiment. Held only while a run is opened, never while it is logged to. Other stores: no lock."""
    uri = tracking_uri(cfg)
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(db.with_name(f".{db.name}.lock"), wait=True))
        except OSError as exc:
            raise VlaopsError(
                f"tracking.uri={uri}: cannot create the store's directory or lock file ({exc.strerror}: {exc.filename})"
            ) from None
        yield


# (parent run id, tags) that new runs opened by run() nest under: set by nested_under, for a sweep's jobs
_PARENT: contextvars.ContextVar[tuple[str, dict[str, str]] | None] = contextvars.ContextVar(
    "vlaops_parent_run", default=None
)


@contextlib.contextmanager
def nested_under(parent_run_id: str | None, tags: dict[str, Any] | None = None) -> Iterator[None]:
    """Inside the block every new run that :func:`run` opens (a sweep job's train run) is a child of
    ``parent_run_id`` (MLflow's nested runs) and carries ``tags``; a re-opened run keeps its place.
    None (tracking disabled): nothing changes."""
    token = _PARENT.set(
        None if parent_run_id is None else (parent_run_id, {k: str(v) for k, v in (tags or {}).items()})
    )
    try:
        yield
    finally:
        _PARENT.reset(token)


@contextlib.contextmanager
def run(
    cfg: TrackingConfig, run_id: str | None = None, tags: dict[str, str] | None = None, parent_run_id: str | None = None
) -> Iterator[Any]:
    """Open (or re-open, by ``run_id``) an MLflow run; it ends KILLED on SIGINT/SIGTERM, FAILED if the
    block raises anything else. A new run is nested under ``parent_run_id`` (or the run of an enclosing
    :func:`nested_under`), which must be running.

    Yields the ``mlflow`` module, or None when tracking is disabled, so callers log through
    :func:`log_metrics` and friends which accept None.
    """
    if not cfg.enabled:
        yield None
        return
    mlflow = _mlflow(cfg)
    run_name = None
    enclosing = _PARENT.get()  # a sweep's parent run, running in this process
    with store_setup_lock(cfg):
        if run_id is None:  # a new run; re-opening one keeps its name and tags
            if mlflow.get_experiment_by_name(cfg.experiment_name) is None:
                mlflow.create_experiment(cfg.experiment_name, artifact_location=artifact_root(cfg))
            mlflow.set_experiment(cfg.experiment_name)
            run_name = cfg.run_name or default_run_name()
            parent_run_id = parent_run_id or (enclosing[0] if enclosing else None)
            tags = {**dvc_tags(), **(enclosing[1] if enclosing else {}), **(tags or {})}
        active = mlflow.start_run(
            run_id=run_id,
            run_name=run_name,
            tags=tags,
            log_system_metrics=cfg.system_metrics,
            nested=parent_run_id is not None or enclosing is not None,
            parent_run_id=parent_run_id,
        )
    log.info("MLflow run %s in %s", active.info.run_id, tracking_uri(cfg))
    try:
        yield mlflow
    except BaseException as exc:  # SIGINT, SIGTERM (under whatever a library raised over it): stopped from outside
        mlflow.end_run(status="KILLED" if signal_behind(exc) is not None else "FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def active_run_id(mlflow: Any) -> str | None:
    return None if mlflow is None else mlflow.active_run().info.run_id


def policy_run_id(model_dir: str | os.PathLike[str]) -> str | None:
    """The MLflow run that trained the policy exported at ``model_dir`` (train writes its id into the
    export's mlflow_run.json), or None for an export without one."""
    run_file = Path(model_dir) / RUN_FILE
    return json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None


def run_exists(cfg: TrackingConfig, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        with store_setup_lock(cfg):
            _mlflow(cfg).get_run(run_id)
        return True
    except MlflowException:
        return False


def log_params(mlflow: Any, params: dict[str, Any]) -> None:
    """Flattened config as params; MLflow caps a value at 6000 characters, lists become strings."""
    if mlflow is None:
        return
    items = {k: str(v)[:6000] for k, v in params.items()}
    keys = sorted(items)
    for i in range(0, len(keys), 100):  # MLflow's batch limit
        mlflow.log_params({k: items[k] for k in keys[i : i + 100]})


def log_tags(mlflow: Any, tags: dict[str, Any]) -> None:
    """Facts about a run that are not measurements (counts, settings of one stage); unlike params they
    may change when a stage re-opens the run."""
    if mlflow is not None and tags:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_datasets(mlflow: Any, splits: dict[str, Path], fingerprint: str) -> None:
    """Each split as an MLflow dataset input (the run page's Dataset column): name ``calvin/<split>``,
    source its directory, digest derived from the data fingerprint and the split's name (the same data
    gives the same digest wherever it lives), the full vlaops fingerprint as a tag, context the split."""
    if mlflow is None:
        return
    import hashlib

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    for split, path in splits.items():
        digest = hashlib.sha256(f"{fingerprint}/{split}".encode()).hexdigest()[:16]
        dataset = MetaDataset(
            LocalArtifactDatasetSource(str(Path(path).resolve())), name=f"calvin/{split}", digest=digest
        )
        mlflow.log_input(dataset, context=split, tags={"vlaops.data_fingerprint": fingerprint})


def log_metrics(mlflow: Any, metrics: dict[str, float], step: int | None = None) -> None:
    if mlflow is not None and metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(mlflow: Any, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    if mlflow is not None and Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


MODELS_URI = "models:/"
MODEL_NAME = "policy"  # the logged model's name in the run


def log_policy_model(mlflow: Any, cfg: TrackingConfig, model_dir: Path, signature: Any, example: Any) -> str | None:
    """Log the export directory as a pyfunc model (``vlaops.model.mlflow_model``, as code, no pickle) and
    register it under ``tracking.registered_model``; returns the registered version, or None."""
    if mlflow is None or not cfg.log_model:
        return None
    import torch
    import transformers
    from mlflow import pyfunc

    from vlaops.model import mlflow_model

    info = pyfunc.log_model(
        name=MODEL_NAME,
        python_model=mlflow_model.__file__,
        artifacts={mlflow_model.POLICY_ARTIFACT: str(model_dir)},
        signature=signature,
        input_example=example,
        registered_model_name=cfg.registered_model,
        # what loading it needs besides vlaops itself, pinned to what trained it (no inference: it imports the model)
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
            "pillow",
            "pandas",
        ],
    )
    version = getattr(info, "registered_model_version", None)
    if version is not None:
        log.info("registered the policy as %s%s/%s", MODELS_URI, cfg.registered_model, version)
    return None if version is None else str(version)


def register_run_model(mlflow: Any, cfg: TrackingConfig, run_id: str | None) -> str | None:
    """Register the policy that run ``run_id`` logged (:func:`log_policy_model` with no registered name) under
    ``tracking.registered_model``: a sweep logs every job's and registers its best job's only."""
    if mlflow is None or run_id is None or not (cfg.log_model and cfg.registered_model):
        return None
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    logged = [
        m
        for m in mlflow.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )
        if m.name == MODEL_NAME
    ]
    if not logged:
        return None
    version = mlflow.register_model(f"{MODELS_URI}{logged[0].model_id}", cfg.registered_model).version
    log.info("registered the policy of run %s as %s%s/%s", run_id, MODELS_URI, cfg.registered_model, version)
    return str(version)


@contextlib.contextmanager
def policy_dir(cfg: TrackingConfig, model_dir: str) -> Iterator[Path]:
    """``paths.model_dir`` as a local export directory: a directory as it is, or a registered model
    (``models:/<name>/<version>``) downloaded from the tracking store for the duration of the block."""
    if not str(model_dir).startswith(MODELS_URI):
        yield Path(model_dir)
        return
    import tempfile

    from mlflow.exceptions import MlflowException

    from vlaops.model import mlflow_model

    mlflow = _mlflow(cfg)
    with tempfile.TemporaryDirectory(prefix="vlaops-model-") as tmp:
        try:
            with store_setup_lock(cfg):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model_dir), dst_path=tmp))
        except (MlflowException, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VlaopsError(
                f"paths.model_dir={model_dir}: no such registered policy in {tracking_uri(cfg)} ({first})"
            ) from None
        policy = local / "artifacts" / mlflow_model.POLICY_ARTIFACT
        if not policy.is_dir():
            raise VlaopsError(
                f"paths.model_dir={model_dir}: not a vlaops policy (no artifacts/{mlflow_model.POLICY_ARTIFACT} in "
                "the model)"
            )
        log.info("evaluating %s (downloaded to %s)", model_dir, policy)
        yield policy


def tag_model_versions(mlflow: Any, cfg: TrackingConfig, run_id: str | None, tags: dict[str, Any]) -> list[str]:
    """Tag every registered version made from ``run_id`` (its evaluation metrics, on the registry's page)."""
    if mlflow is None or run_id is None or not cfg.registered_model:
        return []
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{cfg.registered_model}' and run_id='{run_id}'")
    for v in versions:
        for key, value in tags.items():
            client.set_model_version_tag(v.name, v.version, key, str(value))
    return [str(v.version) for v in versions]
