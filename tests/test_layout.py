"""The package layout holds: imports run downward, CALVIN's convention has one home, and the package
``vlaops.io`` never shadows the standard library's ``io`` (every import is absolute)."""

from __future__ import annotations

import ast
import io as stdlib_io
from pathlib import Path

import numpy as np

from vlaops.data.config import DataConfig
from vlaops.io import calvin_spec, images, rosbag2
from vlaops.io.calvin import rel_actions_from_abs
from vlaops.io.settings import ReaderSettings, TopicSettings

SRC = Path(__file__).resolve().parents[1] / "src" / "vlaops"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in ``path``; level > 0 is a relative import."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            out.extend((0, alias.name) for alias in node.names)
    return out


def test_io_imports_nothing_above_it():
    upward = (
        "vlaops.data",
        "vlaops.model",
        "vlaops.train",
        "vlaops.eval",
        "vlaops.stages",
        "vlaops.sim",
        "vlaops.config",
    )
    found = {
        f"{path.relative_to(SRC)}: {module}"
        for path in (SRC / "io").glob("*.py")
        for _, module in _imports(path)
        if module.startswith(upward)
    }
    assert found == set()


def test_calvin_spec_is_a_leaf():
    assert {module for _, module in _imports(SRC / "io" / "calvin_spec.py")} == {"__future__", "numpy"}


def test_every_import_is_absolute_and_io_is_the_stdlib():
    relative = [
        f"{p.relative_to(SRC)}: {'.' * level}{module}"
        for p in SRC.rglob("*.py")
        for level, module in _imports(p)
        if level
    ]
    assert relative == []
    # io/images.py decodes CompressedImage with ``import io`` -> io.BytesIO: it must be the standard library's
    assert images.io is stdlib_io


def test_data_config_satisfies_the_reader_settings():
    cfg = DataConfig()
    assert all(hasattr(cfg, name) for name in ReaderSettings.__annotations__)
    assert all(hasattr(cfg.topics, name) for name in TopicSettings.__annotations__)
    assert set(TopicSettings.__annotations__) == set(rosbag2.EXPECTED_TYPES)  # one name per stream


def test_model_config_satisfies_the_window_settings():
    """data/dataset.py names what it reads of the model's config in a protocol (data never imports model)."""
    from vlaops.data.dataset import WindowSettings
    from vlaops.model.config import ModelConfig

    cfg = ModelConfig()
    assert all(hasattr(cfg, name) for name in WindowSettings.__annotations__)


def test_rel_actions_use_calvins_scales_and_wrap():
    """The converter's rel_actions invert the simulator's rel -> abs step (calvin_spec, both sides)."""
    robot_obs = np.zeros((2, calvin_spec.ROBOT_OBS_DIM))
    robot_obs[:, 3:6] = [[np.pi - 0.01, 0.0, 0.0], [0.0, 0.0, -np.pi + 0.01]]
    rel = np.array([[0.5, -1.0, 0.25, 0.4, 0.0, -0.2, 1.0], [-0.5, 0.0, 1.0, 0.0, 0.6, 0.8, -1.0]])
    actions = robot_obs[:, :7].copy()
    actions[:, :3] += rel[:, :3] * calvin_spec.REL_POS_SCALE
    actions[:, 3:6] = calvin_spec.wrap_angle(robot_obs[:, 3:6] + rel[:, 3:6] * calvin_spec.REL_ORN_SCALE)
    actions[:, 6] = rel[:, 6]
    np.testing.assert_allclose(rel_actions_from_abs(actions, robot_obs), rel, atol=1e-9)
