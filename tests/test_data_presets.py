"""The data presets of conf/data/ (one per kind of rig the README shows), each used as the README says:
``vlaops inspect`` on the recordings, ``vlaops params data=<preset> data.raw_dir=...`` into a params file,
then ``vlaops ingest --params`` (what ``dvc repro`` runs) on real files written by the test factories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bagfactory import BASE_LABELS, write_arm_bag, write_base_bag
from conftest import CONF, path_overrides
from h5factory import write_aloha, write_robomimic

from vlaops.cli import main
from vlaops.config import load_config
from vlaops.io.episode import read_episode


def _ros2_arm(raw: Path) -> None:
    for i in range(2):
        write_arm_bag(raw / f"ep{i}", n_frames=20, storage="mcap" if i else "sqlite3", seed=i)


def _aloha_tcp(raw: Path) -> None:
    write_aloha(raw / "episode_0.hdf5", n_frames=20)
    write_aloha(raw / "episode_1.hdf5", n_frames=20, compressed=True)


def _robomimic(raw: Path) -> None:
    write_robomimic(raw / "lift.hdf5", n_demos=2, n_frames=20)


def _robot_car(raw: Path) -> None:
    for i in range(2):
        write_base_bag(raw / f"car{i}", n_frames=18, stamped=bool(i))


# preset -> (recordings it is for, overrides the user adds, what every ingested episode must say)
PRESETS = {
    "ros2_arm": (_ros2_arm, [], {"source_format": "rosbag2", "control_hz": 30.0, "embodiment": "arm"}),
    "aloha_tcp": (_aloha_tcp, [], {"source_format": "hdf5_aloha", "control_hz": 50.0, "embodiment": "arm"}),
    "robomimic": (
        _robomimic,
        ["data.hdf5.robomimic.instruction='lift the cube'"],
        {"source_format": "hdf5_robomimic", "control_hz": 20.0, "embodiment": "arm", "instruction": "lift the cube"},
    ),
    "robot_car": (
        _robot_car,
        ["model.use_hand_rgb=false"],
        {"source_format": "rosbag2", "control_hz": 10.0, "embodiment": "mobile_base"},
    ),
}


def test_every_preset_is_tested():
    presets = {p.stem for p in (CONF / "data").glob("*.yaml")} - {"default"}
    assert presets == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_from_the_default(preset):
    """A preset is the default with a few keys changed: what it does not set stays the default's."""
    cfg = load_config([f"data={preset}"], CONF)
    default = load_config([], CONF)
    assert cfg.data.raw_dir == "data/recordings"  # never the simulator's bags by accident
    assert cfg.data.episodes_dir == default.data.episodes_dir and cfg.data.checks == default.data.checks
    assert cfg.data.control_hz == PRESETS[preset][2]["control_hz"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_inspects_and_ingests_real_recordings(tmp_path, preset):
    write, extra, expected = PRESETS[preset]
    raw = tmp_path / "recordings"
    write(raw)
    paths = [p for p in path_overrides(tmp_path) if not p.startswith("paths.collect_dir")]
    overrides = [f"data={preset}", f"data.raw_dir={raw}", "data.num_workers=1", *paths, *extra]
    summary = tmp_path / "inspect.json"

    assert main(["inspect", str(raw), *overrides, "--json", str(summary), "--config-dir", str(CONF)]) == 0
    seen = json.loads(summary.read_text())
    assert seen["episodes"] == 2 and seen["unreadable"] in (0, [])

    params = tmp_path / "params.yaml"
    assert main(["params", "--params", str(params), *overrides, "--config-dir", str(CONF)]) == 0
    assert main(["ingest", "--params", str(params)]) == 0
    report = json.loads((tmp_path / "episodes" / "ingest_report.json").read_text())
    assert report["quarantined"] == [] and len(report["episodes"]) == 2
    for name in report["episodes"]:
        episode = read_episode(tmp_path / "episodes" / f"{name}.h5")
        assert {key: getattr(episode, key) for key in expected} == expected
        if preset == "robot_car":
            assert episode.action_base.shape == (18, 4) and episode.rgb_gripper is None
            assert json.loads(episode.extra_attrs["action_types"]) == BASE_LABELS
        else:
            assert episode.action_abs.shape == (20, 7) and episode.rgb_gripper is not None
            assert episode.scene_obs is None  # a real rig records no scene state


def test_robomimic_preset_asks_for_the_instruction(tmp_path, capsys):
    """robomimic files carry no language: without data.hdf5.robomimic.instruction ingest names that key."""
    _robomimic(tmp_path / "recordings")
    paths = [p for p in path_overrides(tmp_path) if not p.startswith("paths.collect_dir")]
    argv = ["ingest", "data=robomimic", f"data.raw_dir={tmp_path}/recordings", "data.num_workers=1", *paths]
    assert main([*argv, "--config-dir", str(CONF)]) == 1
    assert "data.hdf5.robomimic.instruction is null" in capsys.readouterr().err
