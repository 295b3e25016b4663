"""Validation before cost: a bad configured path fails in the stage's first second with one line that
names the config key and the path, before any data is read or any model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, SHRINK_MODEL, path_overrides

from vlaops.cli import main


def _stage(name: str, tmp_path: Path, *extra: str) -> int:
    return main([name, "--config-dir", str(CONF), *path_overrides(tmp_path), *SHRINK_MODEL, *extra])


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    return f


@pytest.mark.parametrize(
    "stage, key",
    [
        ("train", "paths.model_dir"),
        ("train", "paths.checkpoint_dir"),
        ("train", "paths.reports_dir"),
        ("evaluate", "paths.reports_dir"),
        ("convert", "data.calvin_dir"),
        ("normalize", "data.normalized_dir"),
    ],
)
def test_an_output_under_a_file_fails_first_naming_the_key(tmp_path, a_file, capsys, stage, key):
    # the inputs are empty directories: reading them would fail, so the output check must come first
    (tmp_path / "episodes").mkdir()
    (tmp_path / "calvin").mkdir()
    assert _stage(stage, tmp_path, f"{key}={a_file}/out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {key}={a_file}/out: {a_file} is a file" in err[0], err


def test_a_tracking_store_under_a_file_names_tracking_uri(tmp_path, a_file, capsys):
    assert _stage("train", tmp_path, f"tracking.uri=sqlite:///{a_file}/x.db") == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"tracking.uri=sqlite:///{a_file}/x.db: {a_file} is a file" in line


@pytest.mark.parametrize("stage, key", [("convert", "data.episodes_dir"), ("train", "data.calvin_dir")])
def test_a_missing_or_file_input_names_the_key(tmp_path, a_file, capsys, stage, key):
    assert _stage(stage, tmp_path, f"{key}={a_file}") == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{key}={a_file}: is not a directory" in line


def test_an_unknown_experiment_lists_the_options(capsys):
    assert main(["params", "--config-dir", str(CONF), "--check", "experiment=nosuch"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "Could not find 'experiment/nosuch'" in line
    assert line.endswith(
        "available options in 'experiment': calvin_d, cpu_long, lookup, lookup_long, lora, robovlms_kosmos2"
    )


def test_vlaops_check_runs_every_stages_checks(tmp_path, a_file, capsys):
    """`vlaops check`: the config, every stage's outputs and the store, with no data read and no model built."""
    assert main(["check", "--config-dir", str(CONF), *path_overrides(tmp_path)]) == 0
    assert main(["check", "--config-dir", str(CONF), *path_overrides(tmp_path), f"data.normalized_dir={a_file}/n"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"vlaops check: error: data.normalized_dir={a_file}/n: {a_file} is a file" in line
    assert (
        main(["check", "--config-dir", str(CONF), *path_overrides(tmp_path), f"tracking.uri=sqlite:///{a_file}/x.db"])
        == 1
    )
    assert "tracking.uri=sqlite:///" in capsys.readouterr().err
