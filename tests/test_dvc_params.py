"""dvc.yaml lists, for each stage, exactly the parameters the stage reads: derived from the code.

A stage's reads are the ``cfg.<group>.<key>`` chains in ``src/vlaops/stages/<stage>.py`` and in the library
module it hands the whole config to (``train(cfg)``, ``evaluate(cfg, model_dir)``: ``WHOLE`` below); where a
stage hands a sub-config whole to the library (``ingest(..., cfg.data)``, ``TabletopEnv(cfg.sim)``) and
dvc.yaml lists only some of its keys, the reads are the ``cfg.<key>`` / ``self.cfg.<key>`` chains of the
library modules that receive it (``LIBRARY`` below). A key a stage reads must be in its ``params:`` (or
be a path interpolated into its deps/outs), and a listed key must be read: a missing one means
`dvc repro` would not re-run the stage when it changes; a stale one re-runs it for nothing. Not counted:
``to_container(cfg)`` (the whole config recorded as provenance in MLflow and the export), the global
``seed`` (``vlaops.cli`` seeds every stage; only train's output depends on it, and train lists it), and
``tracking`` (where results are recorded, not what is computed: changing the run name or the store must
not retrain; test_tracking_is_no_stage_param), and ``compute`` (where the tasks run, local processes or a
Ray cluster, not what they compute: the outputs are the same bytes either way, tests/test_executor.py).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from vlaops.config import compose

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vlaops"
STAGES = ("pretrain", "collect", "ingest", "convert", "normalize", "train", "evaluate")
# read by stages, but they say where results go (tracking) or where the work runs (compute), not what it is
NOT_PARAMS = ("tracking", "compute", "paths.checkpoint_dir")  # the last: the trainer's scratch, see below

# stage -> the library modules the stage hands the whole config to, which read it as ``cfg`` throughout
WHOLE: dict[str, list[str]] = {
    "train": ["train/trainer.py"],
    "evaluate": ["eval/evaluate.py"],
    "pretrain": ["pretrain/run.py"],
}

# stage -> {sub-config handed to the library whole: the modules that read it as ``cfg`` / ``self.cfg``}
LIBRARY: dict[str, dict[str, list[str]]] = {
    "pretrain": {},  # hands the library cfg.pretrain whole (listed whole) and the model keys one by one
    "collect": {"sim": ["sim/record.py", "sim/env.py"]},
    "ingest": {"data": ["data/ingest.py", "io/rosbag2.py", "io/mobile_base.py", "io/hdf5.py"]},
    "convert": {"data": ["data/convert.py"]},
    "normalize": {"data": ["data/action_stats.py"]},
    "train": {},  # reads its groups key by key or lists them whole
    "evaluate": {"sim": ["sim/env.py", "eval/plan.py"]},
}


def _chains(path: Path, roots: tuple[str, ...]) -> set[str]:
    """Dotted attribute chains read from a root (``cfg.data.raw_dir`` -> ``data.raw_dir``)."""
    tree = ast.parse(path.read_text())
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue  # only the outermost attribute of each chain
        parts, cur = [], node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        dotted = ".".join([cur.id, *reversed(parts)]) if isinstance(cur, ast.Name) else ""
        for root in roots:
            if dotted.startswith(root + "."):
                out.add(dotted[len(root) + 1 :])
    return out


def _node(composed: dict, dotted: str):
    for part in dotted.split("."):
        composed = composed[part]
    return composed


def _is_key(composed: dict, dotted: str) -> bool:
    node = composed
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _covers(listed: str, key: str) -> bool:
    return key == listed or key.startswith(listed + ".")


def stage_reads(stage: str, listed: list[str], composed: dict) -> set[str]:
    """Config keys ``stage`` reads, as dotted paths of the composed config."""
    reads = _chains(SRC / "stages" / f"{stage}.py", ("cfg",))
    for module in WHOLE.get(stage, []):
        reads |= _chains(SRC / module, ("cfg",))
    for group, modules in LIBRARY[stage].items():
        if group in reads and not any(_covers(p, group) for p in listed):
            reads.discard(group)  # handed whole to the library, listed key by key: what does it read?
            for module in modules:
                reads |= {f"{group}.{k}" for k in _chains(SRC / module, ("cfg", "self.cfg"))}
    # trim each chain to a config key (``cfg.sim.tasks.index`` -> ``sim.tasks``); a chain that trims back to
    # a group is a method or property of its dataclass (``sim.substeps``), whose own reads are seen directly
    out = set()
    for key in reads:
        parts = key.split(".")
        while parts and not _is_key(composed, ".".join(parts)):
            parts.pop()
        trimmed = ".".join(parts)
        if parts and (trimmed == key or not isinstance(_node(composed, trimmed), dict)):
            out.add(trimmed)
    return {k for k in out if k != "seed" and not any(_covers(p, k) for p in NOT_PARAMS)}


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def composed() -> dict:
    return OmegaConf.to_container(compose([], ROOT / "conf"), resolve=True)


def _interpolated(spec: dict) -> set[str]:
    """The ``${key}`` paths a stage's deps/outs/metrics/plots name (they change the stage when they change)."""
    text = yaml.safe_dump({k: spec.get(k) for k in ("deps", "outs", "metrics", "plots")})
    return set(re.findall(r"\$\{([^}]+)\}", text))


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_params_are_what_the_stage_reads(stage, dvc, composed):
    listed = [p for p in dvc[stage].get("params", []) if p != "seed"]
    assert all(_is_key(composed, p) for p in listed), f"{stage}: a listed param is not a config key: {listed}"
    reads = stage_reads(stage, listed, composed)
    paths = _interpolated(dvc[stage])
    missing = sorted(k for k in reads if not any(_covers(p, k) for p in listed) and k not in paths)
    assert missing == [], f"dvc.yaml stage {stage} reads {missing} but does not list them under params"
    stale = sorted(p for p in listed if not any(_covers(p, k) or _covers(k, p) for k in reads))
    assert stale == [], f"dvc.yaml stage {stage} lists {stale} under params but never reads them"


def test_train_lists_the_global_seed(dvc):
    """``vlaops.cli`` seeds torch before train builds the policy: the initial weights depend on ``seed``."""
    assert "seed" in dvc["train"]["params"]


def test_the_derivation_sees_what_it_should(composed):
    """The AST walk finds the reads written in the code (so the test above can fail)."""
    reads = stage_reads("evaluate", ["eval", "sim.tasks"], composed)
    assert {"sim.static_camera_size", "sim.block_x_range", "data.calvin_dir", "eval.num_workers"} <= reads
    assert "tracking" in _chains(SRC / "stages" / "evaluate.py", ("cfg",))  # read, and deliberately not a param
    assert all("compute" in _chains(SRC / "stages" / f"{s}.py", ("cfg",)) for s in ("collect", "ingest", "evaluate"))
    assert "data.raw_dir" not in reads and "sim.episodes_per_task" not in reads
    ingest = stage_reads("ingest", ["data.topics"], composed)
    assert {"data.topics", "data.control_hz", "data.on_bad_input", "data.raw_dir"} <= ingest
    assert all(k.startswith("data.") for k in ingest)


def test_tracking_is_no_stage_param(dvc):
    """`dvc exp run -S tracking.run_name=x` (or another store) must not re-run train or evaluate; nor
    `-S compute.executor=ray` collect, ingest or evaluate."""
    assert not [s for s, spec in dvc.items() for p in spec.get("params", []) if any(_covers(n, p) for n in NOT_PARAMS)]


def test_train_checkpoints_survive_dvc_so_a_killed_train_resumes(dvc):
    """DVC deletes a stage's outputs before it runs the stage, so a killed train could never resume if the
    checkpoint directory were one; and a clone that pulled the policy would retrain for the checkpoints it
    lacks (tests/test_e2e.py). The trainer alone owns it: no stage names it."""
    named = [
        s
        for s, spec in dvc.items()
        for k in ("outs", "deps")
        for o in spec.get(k, [])
        if "${paths.checkpoint_dir}" in (o if isinstance(o, str) else next(iter(o)))
    ]
    assert named == []


def test_bytecode_beside_the_sources_is_no_dependency():
    """Stages depend on source directories (src/vlaops/sim, src/vlaops/io, ...); the __pycache__ Python
    writes into them on any import must not make DVC see a changed dependency (and re-run the pipeline)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        ignored = repo.dvcignore.is_ignored_file
        assert ignored(str(SRC / "sim" / "__pycache__" / "env.cpython-311.pyc"))
        assert ignored(str(SRC / "io" / "stray.pyc"))
        assert not ignored(str(SRC / "sim" / "env.py"))
