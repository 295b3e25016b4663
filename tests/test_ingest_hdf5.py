"""ingest of HDF5 recordings written with h5py: canonical, ALOHA/ACT (raw and JPEG-compressed) and robomimic,
each chosen per file by its content; mapped by data.hdf5.<layout>; bad files and bad demos named."""

from __future__ import annotations

import numpy as np
import pytest
from h5factory import ALOHA_POSE_OVERRIDES, tcp_path, write_aloha, write_robomimic

from vlaops.data.ingest import ingest
from vlaops.errors import VlaopsError
from vlaops.io.calvin_spec import wrap_angle
from vlaops.io.episode import read_episode


def _cfg(tmp_path, *overrides):
    from conftest import tiny_config

    return tiny_config(tmp_path, "data.on_bad_input=quarantine", *overrides).data


def _expected_pose_actions(n: int, gripper_open_first: bool = True) -> np.ndarray:
    """The target of frame k is the TCP pose of frame k + 1 (the last frame holds its own pose)."""
    from vlaops.io.geometry import quat_to_euler

    pos, quat = tcp_path(n)
    nxt = np.minimum(np.arange(n) + 1, n - 1)
    grip = np.where(np.arange(n) < n // 2, 1.0, -1.0)[:, None]
    return np.concatenate([pos[nxt], quat_to_euler(quat[nxt]), grip], axis=1)


@pytest.mark.parametrize("compressed", [False, True])
def test_aloha_file_with_a_pose_is_mapped(tmp_path, compressed):
    cfg = _cfg(tmp_path, *ALOHA_POSE_OVERRIDES)
    write_aloha(tmp_path / "raw" / "episode_0.hdf5", compressed=compressed)
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert report["quarantined"] == [] and list(report["episodes"]) == ["episode_0"]
    ep = read_episode(tmp_path / "episodes" / "episode_0.h5")
    assert ep.source_format == "hdf5_aloha" and ep.instruction == "fold the towel" and ep.task == "fold_the_towel"
    assert ep.rgb_static.shape == (20, 32, 32, 3) and ep.rgb_gripper.shape == (20, 32, 32, 3)
    tol = 3 if compressed else 0  # JPEG is lossy, but frame k is still image k
    assert np.abs(ep.rgb_static[:, -1, 0, 0].astype(int) - (np.arange(20) + 10)).max() <= tol  # 'top' is static
    assert np.abs(ep.rgb_gripper[:, -1, 0, 0].astype(int) - np.arange(20)).max() <= tol
    np.testing.assert_allclose(np.diff(ep.time), 1 / 30)
    pos, _ = tcp_path(20)
    np.testing.assert_allclose(ep.robot_obs[:, :3], pos)
    np.testing.assert_allclose(ep.robot_obs[:, 6], 0.08)  # gripper column of qpos
    np.testing.assert_allclose(ep.robot_obs[:, 7], 0.01 * np.arange(20))  # joint 1 of the ready pose
    expected = _expected_pose_actions(20)
    np.testing.assert_allclose(ep.action_abs[:, :3], expected[:, :3])
    np.testing.assert_allclose(wrap_angle(ep.action_abs[:, 3:6] - expected[:, 3:6]), 0, atol=1e-9)
    np.testing.assert_array_equal(ep.action_abs[:, 6], expected[:, 6])


def test_standard_aloha_joint_actions_are_refused_with_the_reason(tmp_path):
    """The bimanual ALOHA file records joints only: a TCP-pose action would need the robot's kinematics.
    It used to be 'not a recording vlaops can read'."""
    cfg = _cfg(tmp_path, "data.control_hz=20", "data.hdf5.robomimic.instruction=lift")
    write_aloha(tmp_path / "raw" / "episode_0.hdf5", pose=False)
    write_robomimic(tmp_path / "raw" / "lift.hdf5", n_demos=1)
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["lift_demo_0"]
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["check"], entry["stream"]) == ("episode_0.hdf5", "needs_kinematics", "action")
    assert "absolute joint action (data.hdf5.aloha.action_expression)" in entry["reason"]
    assert "needs the robot's kinematics" in entry["reason"]


def test_robomimic_demos_become_episodes_with_absolute_pose_actions(tmp_path):
    cfg = _cfg(tmp_path, "data.control_hz=20", "data.hdf5.robomimic.instruction='lift the cube'")
    write_robomimic(tmp_path / "raw" / "lift.hdf5", n_demos=2)
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["lift_demo_0", "lift_demo_1"] and report["quarantined"] == []
    ep = read_episode(tmp_path / "episodes" / "lift_demo_1.h5")
    assert ep.source_format == "hdf5_robomimic" and ep.instruction == "lift the cube" and ep.control_hz == 20
    assert ep.rgb_static.shape == (20, 32, 32, 3) and ep.rgb_gripper.shape == (20, 16, 16, 3)
    np.testing.assert_array_equal(ep.rgb_static[:, -1, 0, 0], np.arange(20) + 1)  # agentview of demo 1
    np.testing.assert_allclose(ep.robot_obs[:, 6], 0.08)  # |0.04| + |-0.04|
    expected = _expected_pose_actions(20)
    expected[:, 2] += 0.01  # demo 1 is 1 cm higher
    # the delta action of frame k reaches the pose of frame k + 1, through env_args' OSC_POSE scales
    np.testing.assert_allclose(ep.action_abs[:, :3], expected[:, :3], atol=1e-12)
    np.testing.assert_allclose(wrap_angle(ep.action_abs[:-1, 3:6] - expected[:-1, 3:6]), 0, atol=1e-9)
    np.testing.assert_array_equal(ep.action_abs[:, 6], expected[:, 6])  # robosuite -1 (open) -> CALVIN +1


def test_robomimic_relative_scale_comes_from_env_args(tmp_path):
    """The config's scale is only the fallback: a file whose controller says 0.05 m per unit is read with it."""
    cfg = _cfg(
        tmp_path,
        "data.control_hz=20",
        "data.hdf5.robomimic.instruction=lift",
        "data.hdf5.robomimic.relative_pos_scale=0.5",
    )
    write_robomimic(tmp_path / "raw" / "lift.hdf5", n_demos=1)
    ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    ep = read_episode(tmp_path / "episodes" / "lift_demo_0.h5")
    np.testing.assert_allclose(ep.action_abs[:-1, :3], ep.robot_obs[1:, :3], atol=1e-12)


def test_one_bad_demo_is_quarantined_alone(tmp_path):
    cfg = _cfg(tmp_path, "data.control_hz=20", "data.hdf5.robomimic.instruction=lift")
    write_robomimic(tmp_path / "raw" / "lift.hdf5", n_demos=4, broken={1: "nan_action", 2: "missing_image"})
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["lift_demo_0", "lift_demo_3"]
    got = [(q["recording"], q["episode"], q["check"], q["stream"]) for q in report["quarantined"]]
    assert got == [
        ("lift.hdf5", "demo_1", "non_finite", "action/abs"),
        ("lift.hdf5", "demo_2", "missing_stream", "obs/agentview_image"),
    ]


def test_error_mode_names_file_and_demo(tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, "data.control_hz=20", "data.hdf5.robomimic.instruction=lift").data
    write_robomimic(tmp_path / "raw" / "lift.hdf5", n_demos=2, broken={1: "missing_image"})
    with pytest.raises(VlaopsError) as info:
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert str(info.value) == (
        f"{tmp_path}/raw/lift.hdf5 episode 'demo_1': key 'obs/agentview_image' "
        "(data.hdf5.robomimic.rgb_static) is not in the file; obs has ['robot0_eef_pos', "
        "'robot0_eef_quat', 'robot0_eye_in_hand_image', 'robot0_gripper_qpos', 'robot0_joint_pos']"
    )


def test_layout_is_chosen_by_content_not_extension(tmp_path, cfg, raw_dir):
    """A canonical episode (what ingest writes) named .bin is read as one; a text file named .hdf5 is not HDF5."""
    ingest(raw_dir, tmp_path / "first", cfg.data)
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    (raw2 / "copy.bin").write_bytes((tmp_path / "first" / "ep1.h5").read_bytes())
    (raw2 / "fake.hdf5").write_text("not hdf5")
    report = ingest(raw2, tmp_path / "second", _cfg(tmp_path))
    assert list(report["episodes"]) == ["ep1"]  # the canonical file's own episode id
    assert [(q["recording"], q["check"]) for q in report["quarantined"]] == [("fake.hdf5", "unknown_format")]
    a, b = read_episode(tmp_path / "first" / "ep1.h5"), read_episode(tmp_path / "second" / "ep1.h5")
    assert (a.source, a.source_sha256, a.source_format) == (b.source, b.source_sha256, b.source_format)
    np.testing.assert_array_equal(a.action_abs, b.action_abs)


def test_duplicate_episode_ids_are_quarantined(tmp_path, cfg, raw_dir):
    ingest(raw_dir, tmp_path / "first", cfg.data)
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    for name in ("a.h5", "b.h5"):
        (raw2 / name).write_bytes((tmp_path / "first" / "ep0.h5").read_bytes())
    report = ingest(raw2, tmp_path / "second", _cfg(tmp_path))
    assert list(report["episodes"]) == ["ep0"]
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["episode"], entry["check"]) == ("b.h5", "b", "duplicate_episode_id")
    assert entry["reason"] == "episode id 'ep0' is already taken by another recording"


def test_unknown_hdf5_layout_is_named(cfg, tmp_path):
    import h5py

    (tmp_path / "raw").mkdir()
    with h5py.File(tmp_path / "raw" / "other.h5", "w") as f:
        f.create_dataset("foo", data=np.zeros(3))
    with pytest.raises(
        VlaopsError, match=r"other.h5: an HDF5 file in no layout vlaops reads \(top-level keys \['foo'\]\)"
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)


def test_hdf5_map_is_validated_at_once(tmp_path):
    from conftest import tiny_config

    with pytest.raises(
        VlaopsError,
        match=r"data.hdf5.aloha.action_expression must be one of \('absolute_pose', "
        r"'relative_pose', 'absolute_joint'\), got 'joint'",
    ):
        tiny_config(tmp_path, "data.hdf5.aloha.action_expression=joint")
    with pytest.raises(VlaopsError, match=r"data.hdf5.robomimic.gripper_open_sign must be 1 or -1, got 0.5"):
        tiny_config(tmp_path, "data.hdf5.robomimic.gripper_open_sign=0.5")


def test_episode_id_that_is_not_a_file_name_is_refused(tmp_path, cfg, raw_dir):
    """A canonical file's episode_id attr names the output file: '../x' must not write outside data/episodes."""
    import h5py

    ingest(raw_dir, tmp_path / "first", cfg.data)
    raw2 = tmp_path / "raw2"
    raw2.mkdir()
    (raw2 / "evil.h5").write_bytes((tmp_path / "first" / "ep0.h5").read_bytes())
    (raw2 / "good.h5").write_bytes((tmp_path / "first" / "ep1.h5").read_bytes())
    with h5py.File(raw2 / "evil.h5", "r+") as f:
        f.attrs["episode_id"] = "../escaped"
    report = ingest(raw2, tmp_path / "out" / "episodes", _cfg(tmp_path))
    assert list(report["episodes"]) == ["ep1"] and not (tmp_path / "out" / "escaped.h5").exists()
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["check"]) == ("evil.h5", "bad_episode_id")
