"""The whole configuration: one typed tree composed by Hydra from ``conf/`` and validated at once.

``conf/`` is plain YAML so that DVC's own Hydra composition (``dvc exp run -S key=value``) can
compose it into ``params.yaml`` without importing vlaops. Validation is therefore a merge onto the
structured schema below: an unknown or misspelt key, or a value of the wrong type, is an error that
names the key, before any work starts.

One source for each value: ``conf/`` holds the values in force (DVC composes it without vlaops). The
dataclass defaults say the same for code that builds a component directly (tests, an exported
``policy_config.json``), and tests/test_config.py holds the two equal, value for value. Values that
describe one fact twice are interpolations in ``conf/`` (``data.raw_dir: ${paths.collect_dir}``), so a
composed params.yaml always carries them resolved and equal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlaops.data.config import DataConfig
from vlaops.errors import VlaopsError
from vlaops.eval.config import EvalConfig
from vlaops.model.config import ModelConfig
from vlaops.pretrain.config import PretrainConfig
from vlaops.serve.config import ServeConfig
from vlaops.sim.config import SimConfig
from vlaops.tracking import TrackingConfig
from vlaops.train.config import TrainConfig
from vlaops.utils.executor import ComputeConfig

CONFIG_NAME = "config"
DEFAULT_CONFIG_DIR = "conf"


@dataclass
class PathsConfig:
    collect_dir: str = "data/raw"  # where the simulator records; data.raw_dir defaults to it
    # `vlaops pretrain` writes the tiny Kosmos-2 here; model.pretrained_dir defaults to it
    pretrained_dir: str = "models/pretrained"
    model_dir: str = "models/policy"
    checkpoint_dir: str = "models/checkpoints"
    reports_dir: str = "reports"


@dataclass
class Config:
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        # One range for both: a demonstration faster than the training normalisation's clip range is
        # clipped away in training (RoboVLMs' +-0.65) and no policy can reproduce it.
        limit = min(-self.data.norm_min, self.data.norm_max)
        if self.sim.expert_max_action > limit:
            raise ValueError(
                f"sim.expert_max_action={self.sim.expert_max_action} exceeds the normalisation range "
                f"data.norm_min/norm_max=[{self.data.norm_min}, {self.data.norm_max}]; set it <= {limit}"
            )


def validate(raw: DictConfig | dict[str, Any], source: str) -> Config:
    """Merge ``raw`` onto the schema and build the typed config; errors name the key and ``source``."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise VlaopsError(f"{source}: config key(s) {missing} must be set (they are '???'), e.g. {missing[0]}=...")
        return OmegaConf.to_object(merged)  # runs every __post_init__
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        known = sorted(node.keys()) if isinstance(node, DictConfig) else []
        raise VlaopsError(
            f"{source}: config key '{key}' does not exist; known keys{f' of {parent!r}' if parent else ''}: {known}"
        ) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "")
        raise VlaopsError(f"{source}: config key '{key}': {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # a component's __post_init__
        raise VlaopsError(f"{source}: {exc}") from None


def compose(
    overrides: list[str] | None = None,
    config_dir: str | os.PathLike[str] = DEFAULT_CONFIG_DIR,
    return_hydra_config: bool = False,
) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (``train.max_steps=10``, ``model=kosmos2``); with
    ``return_hydra_config`` the result keeps Hydra's own node too (``hydra.sweeper``, ``hydra.sweep.dir``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir).resolve()
    if not (config_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise VlaopsError(f"{config_dir}/{CONFIG_NAME}.yaml: not found; run from the project root or pass --config-dir")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(
                config_name=CONFIG_NAME, overrides=list(overrides or []), return_hydra_config=return_hydra_config
            )
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        unknown = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
        if unknown:
            raise VlaopsError(
                f"{config_dir}: config key '{unknown.group(1)}' does not exist (misspelt? "
                f"'+{unknown.group(1)}=...' would add it, and the schema would then reject it)"
            ) from None
        options = re.search(r"Available options in '([^']+)':\n((?:\t[^\n]*\n?)*)", str(exc))
        if options:  # Hydra lists the options one per line; keep them all on the one line
            names = ", ".join(o.strip() for o in options.group(2).splitlines() if o.strip())
            raise VlaopsError(
                f"{config_dir}: {lines[0]}; available options in '{options.group(1)}': {names or 'none'}"
            ) from None
        raise VlaopsError(f"{config_dir}: {' '.join(lines[:2])}") from None


def load_params(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """Read a composed ``params.yaml`` (what DVC runs from), apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise VlaopsError(f"{path}: params file not found")
    try:
        raw = OmegaConf.create(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise VlaopsError(f"{path}: not valid YAML ({exc})") from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise VlaopsError(f"overrides must look like key=value, got {bad}")
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    return validate(raw, str(path))


def load_config(overrides: list[str] | None = None, config_dir: str | os.PathLike[str] = DEFAULT_CONFIG_DIR) -> Config:
    return validate(compose(overrides, config_dir), f"{config_dir}/{CONFIG_NAME}.yaml")


def to_container(cfg: Config) -> dict[str, Any]:
    """The typed config as plain nested dicts (for params.yaml, MLflow params, exported artefacts)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def dump_params(raw: DictConfig) -> str:
    """The YAML text of ``params.yaml`` for a composed config (what ``vlaops params`` writes)."""
    return yaml.safe_dump(OmegaConf.to_container(raw, resolve=True), sort_keys=False)
