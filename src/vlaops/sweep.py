"""``vlaops train -m ...``: a sweep. One training job per setting, each job an MLflow run nested under
one parent run of the sweep, which keeps the best job when the sweep ends.

Hydra does the sweeping, as ``@hydra.main`` with ``-m`` does: its override grammar (``a=1,2``,
``range(1,5)``, ``choice(a,b)``, ``glob(*)``, ``tag(log, interval(1e-4, 1e-2))``), its sweeper
(``hydra.sweeper``: the BasicSweeper's grid by default, hydra-optuna-sweeper's study with
``hparams_search=train_lr``, conf/hparams_search/) and its BasicLauncher: jobs one after another in this
process, job N in ``hydra.sweep.dir/N`` with its ``.hydra/`` config beside it. Before the first job, every
job of a grid (for a search space: every choice and both bounds of every range) is composed and validated,
so an unknown key or a bad value is one line, no job and no run.

Each job writes its policy, checkpoints and reports under its own directory (``JOB_PATHS``), so no job
overwrites or locks another's; the data and its frame cache are shared. The objective is the job's last
validation loss (``val/loss``: the exported policy's), lower is better. A job is not evaluated in the
simulator (the chains cost more than a tiny job's training): the sweep ends naming the best job and the
``vlaops evaluate`` command for it, which logs onto that job's run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlaops import tracking
from vlaops.config import CONFIG_NAME, Config, compose, load_config, validate
from vlaops.errors import VlaopsError
from vlaops.utils.atomic import write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

# evaluate re-opens the run that trained the policy: a sweep of it would write N evaluations onto one run
SWEEPABLE = ("train",)
OBJECTIVE = tracking.VAL_LOSS  # minimised; train exports it as train_result.json's last_val_loss
TRAIN_RESULT_FILE = "train_result.json"  # what vlaops.train.trainer writes beside the exported policy
SUMMARY_FILE = "sweep.json"  # in hydra.sweep.dir: every job, its setting, val/loss and run, and the best
# each job's outputs, inside its own directory: the project's layout
JOB_PATHS = {"model_dir": "models/policy", "checkpoint_dir": "models/checkpoints", "reports_dir": "reports"}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
# Hydra configures the root logger for each job by default; vlaops logs through its own (utils.logging)
QUIET_LOGGING = {"hydra/hydra_logging": "none", "hydra/job_logging": "none"}


@dataclass
class Plan:
    """A sweep checked before it runs: what varies, where the jobs write, what the sweeper needs."""

    sweeper: str  # "basic" (a grid) or "optuna" (a study)
    sweep_dir: Path
    overrides: list[str]  # what Hydra's multirun gets: the command line, logging quiet, the sweep dir fixed
    swept: list[str]  # the keys that vary from job to job
    jobs: list[list[str]] = field(default_factory=list)  # basic: each job's task overrides
    search_space: dict[str, str] = field(default_factory=dict)  # optuna: key -> distribution
    n_trials: int = 0
    base: Config | None = None  # the first job's config (the parent run's tracking settings)
    fixed: list[str] = field(default_factory=list)  # the command line's overrides that every job shares

    @property
    def n_jobs(self) -> int:
        return len(self.jobs) if self.sweeper == "basic" else self.n_trials


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("See https://")]
    return "; ".join(lines[:2]) or type(exc).__name__


@contextlib.contextmanager
def _override_parser(config_dir: Path) -> Iterator[Any]:
    """Hydra's override parser with the config loader of ``config_dir`` (``glob(*)`` lists a group's options)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        yield OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)


def _parse(parser: Any, overrides: list[str]) -> list[Any]:
    from hydra.errors import HydraException

    try:
        return parser.parse_overrides(overrides)
    except HydraException as exc:
        raise VlaopsError(_one_line(exc)) from None


def _job_config(overrides: list[str], config_dir: Path, job: str) -> Config:
    """Compose and validate one job's config; the error names the job and the key."""
    try:
        cfg = load_config(overrides, config_dir)
    except VlaopsError as exc:
        raise VlaopsError(f"sweep {job}: {exc}") from None
    if cfg.train.val_batches == 0:
        raise VlaopsError(f"sweep {job}: train.val_batches=0, but a sweep ranks its jobs by {OBJECTIVE}; set it > 0")
    return cfg


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(overrides: list[str], config_dir: str | Path) -> Plan:
    """Parse the sweep with Hydra's grammar, expand it as its sweeper will, and validate every job's
    config (a search space: each choice and each bound), before anything runs."""
    config_dir = Path(config_dir).resolve()
    with _override_parser(config_dir) as parser:
        parsed = _parse(parser, overrides)
    hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
    task = [o for o in parsed if not o.is_hydra_override()]
    for o in task:
        if o.is_sweep_override() and o.key_or_group.startswith("tracking."):
            raise VlaopsError(
                f"{o.input_line}: tracking.* cannot be swept (the jobs' runs nest under one parent in one store)"
            )
    fixed = [o.input_line for o in task if not o.is_sweep_override()]
    quiet = [f"{k}={v}" for k, v in QUIET_LOGGING.items() if not any(o.key_or_group == k for o in parsed)]
    raw = compose([*hydra_overrides, *quiet, *fixed], config_dir, return_hydra_config=True)
    sweeper = raw.hydra.sweeper
    sweep_dir = Path(str(OmegaConf.select(raw, "hydra.sweep.dir")))  # ${now:...} resolved once, for every job
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise VlaopsError(
            f"hydra.sweep.dir={sweep_dir}: exists and is not empty (its jobs would overwrite another sweep's); choose "
            "another"
        )
    # what the sweeper gets, as in Hydra: its params (hydra.sweeper.params) first, the command line after
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments = [*params, *(o.input_line for o in task)]
    multirun = [
        *(o for o in hydra_overrides if not o.startswith("hydra.sweep.dir=")),
        *quiet,
        f"hydra.sweep.dir={_quoted(str(sweep_dir))}",
        *(o.input_line for o in task),
    ]
    if sweeper._target_ == BASIC_SWEEPER:
        result = _plan_grid(config_dir, arguments, hydra_overrides, sweep_dir, multirun)
    elif sweeper._target_ == OPTUNA_SWEEPER:
        result = _plan_search(config_dir, arguments, hydra_overrides, sweep_dir, multirun, sweeper)
    else:
        raise VlaopsError(
            f"hydra.sweeper: {sweeper._target_} is not supported; vlaops sweeps with Hydra's basic "
            "sweeper (a grid) or hydra-optuna-sweeper (hparams_search=...)"
        )
    result.fixed = [o.input_line for o in task if o.key_or_group not in result.swept]
    return result


def _plan_grid(
    config_dir: Path, arguments: list[str], hydra_overrides: list[str], sweep_dir: Path, multirun: list[str]
) -> Plan:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    with _override_parser(config_dir) as parser:
        parsed = _parse(parser, arguments)
        try:  # the BasicSweeper's own expansion (a cartesian product, in the order of the keys)
            (jobs,) = BasicSweeper.split_arguments(parsed, None)
        except HydraException as exc:
            raise VlaopsError(
                f"{_one_line(exc)} (a grid takes a=1,2 range() choice() glob(); interval() needs hparams_search=...)"
            ) from None
    swept = list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))
    configs = [
        _job_config(
            [*hydra_overrides, *job], config_dir, f"job #{i} ({' '.join(_settings(job, swept)) or 'nothing swept'})"
        )
        for i, job in enumerate(jobs)
    ]
    return Plan("basic", sweep_dir, multirun, swept, jobs=jobs, base=configs[0])


def _probe_values(distribution: Any) -> list[Any]:
    """The values of a search-space dimension a job could get at its edges: every choice, or both bounds."""
    choices = getattr(distribution, "choices", None)
    return list(choices) if choices is not None else [distribution.low, distribution.high]


def _plan_search(
    config_dir: Path,
    arguments: list[str],
    hydra_overrides: list[str],
    sweep_dir: Path,
    multirun: list[str],
    sweeper: DictConfig,
) -> Plan:
    from hydra.errors import HydraException
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    direction = OmegaConf.to_container(sweeper, resolve=True)["direction"]
    if str(direction).rsplit(".", 1)[-1] != "minimize":
        raise VlaopsError(
            f"hydra.sweeper.direction={direction}: a vlaops sweep minimises {OBJECTIVE}; set it to minimize"
        )
    if sweeper.n_trials < 1:
        raise VlaopsError(f"hydra.sweeper.n_trials={sweeper.n_trials}: must be >= 1")
    try:  # the plugin's own reading of its params and the command line
        space, fixed_params = create_params_from_overrides(arguments)
    except (HydraException, AssertionError, NotImplementedError, ValueError) as exc:
        raise VlaopsError(f"search space: {_one_line(exc)}") from None
    space = {k: v for k, v in space.items() if k not in fixed_params}
    if not space:
        raise VlaopsError(
            "hparams_search: the search space is empty (hydra.sweeper.params, or a sweep such as "
            "'train.learning_rate=interval(1e-4,1e-2)')"
        )
    fixed = [f"{k}={v}" for k, v in fixed_params.items()]
    first = {k: _probe_values(d)[0] for k, d in space.items()}
    base = None
    for key, distribution in space.items():
        for value in _probe_values(distribution):
            setting = {**first, key: value}
            cfg = _job_config(
                [*hydra_overrides, *fixed, *(f"{k}={v}" for k, v in setting.items())],
                config_dir,
                f"search space ({key}={value})",
            )
            base = base or cfg
    return Plan(
        "optuna",
        sweep_dir,
        multirun,
        list(space),
        search_space={k: repr(v) for k, v in space.items()},
        n_trials=int(sweeper.n_trials),
        base=base,
    )


def _settings(job_overrides: list[str], swept: list[str]) -> list[str]:
    """A job's own values of the swept keys, in the sweep's order (``train.learning_rate=0.003``)."""
    by_key = {o.split("=", 1)[0].lstrip("+~"): o for o in job_overrides}
    return [by_key[k] for k in swept if k in by_key]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_sweep(
    stage: str, overrides: list[str], config_dir: str | Path, run_stage: Callable[[str, Config], None]
) -> dict[str, Any]:
    """Plan the sweep, open its parent run, run every job through Hydra's multirun (``run_stage`` runs
    one job's stage), then keep the best job on the parent run and in ``hydra.sweep.dir/sweep.json``."""
    if stage not in SWEEPABLE:
        raise VlaopsError(f"-m sweeps {', '.join(SWEEPABLE)} only ({stage} re-opens the run that trained the policy)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would run the whole sweep and open a parent run
        raise VlaopsError(
            "-m runs the jobs one after another in one process; start it without accelerate launch / torchrun"
        )
    the_plan = plan(overrides, config_dir)
    assert the_plan.base is not None
    tracking.check_store(the_plan.base.tracking)
    name = the_plan.base.tracking.run_name or time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime())
    parent_cfg = dataclasses.replace(
        the_plan.base.tracking, run_name=name, system_metrics=False
    )  # the jobs sample their own
    tags = {
        "stage": "sweep",
        "sweep.sweeper": the_plan.sweeper,
        "sweep.stage": stage,
        "sweep.dir": str(the_plan.sweep_dir.resolve()),
        "sweep.overrides": " ".join(overrides)[:5000],
        "sweep.swept": " ".join(the_plan.swept),
        "sweep.objective": OBJECTIVE,
        "sweep.jobs": str(the_plan.n_jobs),
    }
    if the_plan.search_space:
        tags["sweep.search_space"] = json.dumps(the_plan.search_space)[:5000]
    log.info(
        "sweep of %d %s job(s) over %s into %s",
        the_plan.n_jobs,
        the_plan.sweeper,
        ", ".join(the_plan.swept) or "no key",
        the_plan.sweep_dir,
    )
    jobs: list[dict[str, Any]] = []
    with tracking.run(parent_cfg, tags=tags) as mlflow:
        parent_id = tracking.active_run_id(mlflow)

        def task(job_cfg: DictConfig) -> float:
            from hydra.core.hydra_config import HydraConfig

            hydra_cfg = HydraConfig.get()
            num, job_dir = int(hydra_cfg.job.num), Path(hydra_cfg.runtime.output_dir)
            settings = _settings(list(hydra_cfg.overrides.task), the_plan.swept)
            cfg = validate(job_cfg, f"sweep job #{num}")
            cfg.paths = dataclasses.replace(cfg.paths, **{k: str(job_dir / v) for k, v in JOB_PATHS.items()})
            # each job logs its policy as an MLflow model; only the best job's is registered, when the sweep ends
            cfg.tracking = dataclasses.replace(cfg.tracking, run_name=f"{name}-{num}", registered_model=None)
            log.info("sweep job #%d: %s -> %s", num, " ".join(settings) or "(nothing swept)", job_dir)
            with tracking.nested_under(parent_id, {"sweep.job": num, "sweep.settings": " ".join(settings)}):
                run_stage(stage, cfg)
            model_dir = Path(cfg.paths.model_dir)
            value = float(json.loads((model_dir / TRAIN_RESULT_FILE).read_text())["last_val_loss"])
            run_id = tracking.policy_run_id(model_dir)
            jobs.append(
                {
                    "job": num,
                    "settings": settings,
                    OBJECTIVE: _finite(value),
                    "run_id": run_id,
                    "dir": str(job_dir),
                    "model_dir": str(model_dir),
                    "reports_dir": cfg.paths.reports_dir,
                }
            )
            tracking.log_metrics(mlflow, {tracking.SWEEP_VAL_LOSS: value}, step=num)  # the parent's: one point per job
            return value

        finished = False
        try:
            _multirun(Path(config_dir).resolve(), the_plan.overrides, task)
            finished = True
        finally:  # the jobs that finished, even when one failed or the sweep was stopped
            summary = _summarize(the_plan, jobs, parent_id)
            best = summary["best"]
            if best is not None:
                if finished:
                    best["registered_version"] = tracking.register_run_model(
                        mlflow, the_plan.base.tracking, best["run_id"]
                    )
                tracking.log_metrics(mlflow, {tracking.BEST_VAL_LOSS: best[OBJECTIVE]})
                tracking.log_tags(
                    mlflow,
                    {
                        "best.job": best["job"],
                        "best.settings": " ".join(best["settings"]),
                        "best.run_id": best["run_id"],
                        "best.model_dir": best["model_dir"],
                        **(
                            {"best.registered_version": best["registered_version"]}
                            if best.get("registered_version")
                            else {}
                        ),
                    },
                )
            write_json(the_plan.sweep_dir / SUMMARY_FILE, summary)
            tracking.log_tags(mlflow, {"sweep.jobs_finished": len(jobs)})
            for artifact in (
                SUMMARY_FILE,
                "optimization_results.yaml",
                "multirun.yaml",
            ):  # ours, the Optuna plugin's, the BasicSweeper's
                tracking.log_artifact(mlflow, the_plan.sweep_dir / artifact, "sweep")
    _report(summary, the_plan)
    return summary


def _multirun(config_dir: Path, overrides: list[str], task: Callable[[DictConfig], float]) -> None:
    """Hydra's own multirun (what ``@hydra.main`` runs for ``-m``): the configured sweeper and launcher."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        GlobalHydra.instance().hydra.multirun(
            config_name=CONFIG_NAME, task_function=task, overrides=overrides, with_log_configuration=False
        )


def _summarize(the_plan: Plan, jobs: list[dict[str, Any]], parent_id: str | None) -> dict[str, Any]:
    ranked = [j for j in jobs if j[OBJECTIVE] is not None]
    best = min(ranked, key=lambda j: (j[OBJECTIVE], j["job"])) if ranked else None
    return {
        "sweeper": the_plan.sweeper,
        "dir": str(the_plan.sweep_dir),
        "objective": OBJECTIVE,
        "direction": "minimize",
        "swept": the_plan.swept,
        "search_space": the_plan.search_space,
        "parent_run_id": parent_id,
        "jobs": sorted(jobs, key=lambda j: j["job"]),
        "best": best,
    }


def _report(summary: dict[str, Any], the_plan: Plan) -> None:
    for job in summary["jobs"]:
        log.info("  job #%d  %s=%s  %s", job["job"], OBJECTIVE, job[OBJECTIVE], " ".join(job["settings"]))
    best = summary["best"]
    if best is None:
        log.warning("sweep: no job has a finite %s", OBJECTIVE)
        return
    own = tuple(f"paths.{k}=" for k in JOB_PATHS)  # the sweep set these per job
    evaluate = [
        "vlaops",
        "evaluate",
        *(o for o in the_plan.fixed if not o.startswith(own)),
        *best["settings"],
        f"paths.model_dir={best['model_dir']}",
        f"paths.reports_dir={best['reports_dir']}",
    ]
    log.info(
        "best: job #%d (%s) %s=%.4g; evaluate it (onto its run) with: %s",
        best["job"],
        " ".join(best["settings"]) or "nothing swept",
        OBJECTIVE,
        best[OBJECTIVE],
        shlex.join(evaluate),
    )
