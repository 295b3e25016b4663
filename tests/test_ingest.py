"""ingest: rosbag2 recordings written with rosbags -> canonical episodes; bad input named and not kept."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from bagfactory import PANDA_READY, write_arm_bag

from vlaops.data.ingest import REPORT_FILE, ingest
from vlaops.errors import VlaopsError
from vlaops.io.episode import read_episode


def test_ingest_syncs_every_stream_to_the_control_rate(cfg, raw_dir, tmp_path):
    out = tmp_path / "episodes"
    report = ingest(raw_dir, out, cfg.data)
    assert sorted(report["episodes"]) == ["ep0", "ep1", "ep2", "ep3"]
    ep = read_episode(out / "ep1.h5")  # an mcap bag
    assert len(ep) == 20 and ep.source_format == "rosbag2" and ep.embodiment == "arm"
    np.testing.assert_allclose(np.diff(ep.time), 1 / 30, atol=1e-6)
    assert ep.rgb_static.shape == (20, 64, 64, 3) and ep.rgb_gripper.shape == (20, 32, 32, 3)
    # frame k holds image k (value k in the lower half), not the frame before or after
    np.testing.assert_array_equal(ep.rgb_static[:, -1, 0, 0], np.arange(20))
    # joint states arrive at 4x the rate: the held one is the one stamped at the tick itself
    np.testing.assert_allclose(ep.robot_obs[:, 7:14], PANDA_READY + 0.01 * np.arange(20)[:, None])
    assert ep.robot_obs.shape == (20, 15) and ep.scene_obs.shape == (20, 24)
    np.testing.assert_allclose(ep.robot_obs[:, 6], 0.08)  # gripper width = both fingers
    np.testing.assert_allclose(ep.robot_obs[1:, 14], ep.action_abs[:-1, 6])  # previous gripper command
    assert ep.instruction == "push the red block to the left" and ep.task == "push_the_red_block_to_the_left"
    assert json.loads((out / REPORT_FILE).read_text())["quarantined"] == []


def test_missing_raw_dir_is_one_clear_error(cfg, tmp_path):
    with pytest.raises(VlaopsError, match=r"missing: raw data directory not found \(data.raw_dir\)"):
        ingest(tmp_path / "missing", tmp_path / "episodes", cfg.data)
    assert not (tmp_path / "episodes").exists()


def test_empty_bag_is_named(cfg, tmp_path):
    write_arm_bag(tmp_path / "raw" / "empty", empty=True)
    with pytest.raises(VlaopsError, match=r"raw/empty: the bag has no messages"):
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)


def test_bag_without_mapped_image_topic_is_named(cfg, tmp_path):
    write_arm_bag(tmp_path / "raw" / "nocam", omit=("static",))
    with pytest.raises(
        VlaopsError,
        match=r"nocam: mapped topic '/camera/static/image_raw' \(data.topics.rgb_static\) is not in the bag",
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)


def test_compressed_images_are_decoded(cfg, tmp_path):
    write_arm_bag(tmp_path / "raw" / "png", compressed="png")
    write_arm_bag(tmp_path / "raw" / "jpeg", compressed="jpeg", storage="mcap")
    ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    png = read_episode(tmp_path / "episodes" / "png.h5")
    assert png.rgb_static.shape == (24, 64, 64, 3) and png.rgb_static.dtype == np.uint8
    np.testing.assert_array_equal(png.rgb_static[:, -1, 0, 0], np.arange(24))  # lossless, frame k is image k
    np.testing.assert_array_equal(png.rgb_static[:, 0, 0, 0], 255 - np.arange(24))  # channels in RGB order
    jpeg = read_episode(tmp_path / "episodes" / "jpeg.h5")
    assert np.abs(jpeg.rgb_static.astype(int) - png.rgb_static.astype(int)).mean() < 3  # lossy, but the same frames


def test_undecodable_compressed_image_is_named(cfg, tmp_path):
    write_arm_bag(tmp_path / "raw" / "broken", compressed="broken")
    with pytest.raises(VlaopsError, match=r"broken: .*/camera/static/image_raw.*cannot decode the compressed image"):
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    assert not (tmp_path / "episodes").exists()


def test_optional_gripper_camera_may_be_absent(cfg, tmp_path):
    write_arm_bag(tmp_path / "raw" / "nogripper", omit=("gripper",))
    ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    assert read_episode(tmp_path / "episodes" / "nogripper.h5").rgb_gripper is None


def test_wrong_rate_and_short_episode_are_named(cfg, tmp_path):
    write_arm_bag(tmp_path / "raw" / "slow", hz=10.0)
    with pytest.raises(VlaopsError, match=r"slow: topic '/action' runs at 10.0 Hz, data.control_hz is 30"):
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    write_arm_bag(tmp_path / "raw2" / "short", n_frames=4)
    with pytest.raises(VlaopsError, match=r"short: 4 synchronised frames, data.min_episode_len is 8"):
        ingest(tmp_path / "raw2", tmp_path / "episodes", cfg.data)


def test_not_a_recording_is_named(cfg, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("hello")
    with pytest.raises(VlaopsError, match=r"notes.txt: not a recording vlaops can read; expected a rosbag2 directory"):
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)


def test_quarantine_keeps_good_episodes_and_reports_bad_ones(tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, "data.on_bad_input=quarantine")
    write_arm_bag(tmp_path / "raw" / "good")
    write_arm_bag(tmp_path / "raw" / "nocam", omit=("static",))
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    assert list(report["episodes"]) == ["good"]
    [entry] = report["quarantined"]
    assert entry["recording"] == "nocam" and entry["episode"] == "nocam" and entry["check"] == "missing_stream"
    assert entry["stream"] == "/camera/static/image_raw" and "data.topics.rgb_static" in entry["reason"]
    on_disk = json.loads((tmp_path / "episodes" / REPORT_FILE).read_text())
    assert on_disk["quarantined"] == report["quarantined"]


def test_failed_ingest_keeps_the_previous_output_whole(cfg, raw_dir, tmp_path):
    out = tmp_path / "episodes"
    ingest(raw_dir, out, cfg.data)
    before = sorted(p.name for p in out.iterdir())
    write_arm_bag(raw_dir / "zz_bad", omit=("action",))
    with pytest.raises(VlaopsError, match="zz_bad"):
        ingest(raw_dir, out, cfg.data)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".episodes")]  # no temp dir left


def _tree_bytes(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_reingest_is_byte_identical(cfg, raw_dir, tmp_path):
    """A forced re-ingest of the same recordings gives the same bytes (report included), so DVC's hash of
    data/episodes does not change; timings go to the log, not the report."""
    ingest(raw_dir, tmp_path / "a", cfg.data)
    ingest(raw_dir, tmp_path / "b", cfg.data)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert list(a) == list(b) and REPORT_FILE in a
    assert a == b
    assert "wall_time_s" not in json.loads(a[REPORT_FILE])


def _quarantine_cfg(tmp_path, *overrides):
    from conftest import tiny_config

    return tiny_config(tmp_path, "data.on_bad_input=quarantine", *overrides).data


def test_camera_changing_size_is_quarantined_and_the_good_episodes_kept_byte_for_byte(tmp_path):
    """It used to stop the whole ingest with numpy's 'all input arrays must have the same shape'."""
    from bagfactory import resize_camera

    cfg = _quarantine_cfg(tmp_path)
    raw = tmp_path / "raw"
    write_arm_bag(raw / "a_good", seed=1)
    write_arm_bag(raw / "c_good", seed=2, storage="mcap")
    clean = ingest(raw, tmp_path / "clean", cfg)
    write_arm_bag(raw / "b_resized", tweak=resize_camera(10, 48))
    mixed = ingest(raw, tmp_path / "mixed", cfg)
    [entry] = mixed["quarantined"]
    assert entry["recording"] == "b_resized" and entry["check"] == "frame_size"
    assert entry["stream"] == "/camera/static/image_raw"
    assert "frame size changes mid-episode, from (64, 64, 3) to (48, 48, 3) at message 10" in entry["reason"]
    assert list(mixed["episodes"]) == list(clean["episodes"]) == ["a_good", "c_good"]
    for name in ("a_good.h5", "c_good.h5"):
        assert (tmp_path / "mixed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_error_mode_is_one_line_naming_recording_topic_and_reason(cfg, tmp_path):
    from bagfactory import resize_camera

    write_arm_bag(tmp_path / "raw" / "resized", tweak=resize_camera(3, 32))
    with pytest.raises(VlaopsError) as info:
        ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    line = str(info.value)
    assert "\n" not in line and line.startswith(str(tmp_path / "raw" / "resized") + ": ")
    assert "topic '/camera/static/image_raw': frame size changes mid-episode" in line
    assert not (tmp_path / "episodes").exists()


def test_nan_joint_reason_names_the_recording_not_a_temp_file(tmp_path):
    from bagfactory import set_joint

    cfg = _quarantine_cfg(tmp_path)
    write_arm_bag(tmp_path / "raw" / "good")
    write_arm_bag(tmp_path / "raw" / "nan_joint", tweak=set_joint(5, 2, float("nan")))
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    [entry] = report["quarantined"]
    assert entry["check"] == "non_finite" and entry["stream"] == "obs/robot_obs"
    assert entry["reason"] == "field 'obs/robot_obs' expected finite values, got NaN or inf"
    text = (tmp_path / "episodes" / REPORT_FILE).read_text()
    assert ".tmp-" not in text and ".episodes" not in text


@pytest.mark.parametrize(
    "tweak, check, stream, reason",
    [
        (
            ("set_action", 12, [1e30, 0.0, 0.3, np.pi, 0.0, 0.0, 1.0]),
            "position_bound",
            "action/abs[:, 0]",
            r"1e\+30 m at frame \d+, beyond data.checks.max_abs_position_m=2.0",
        ),
        (
            ("set_action", 12, [0.4, -0.12, 0.3, 40.0, 0.0, 0.0, 1.0]),
            "angle_bound",
            "action/abs[:, 3]",
            r"40 rad at frame \d+, beyond data.checks.max_abs_angle_rad=6.3",
        ),
        (
            ("set_action", 12, [0.4, -0.4, 0.3, np.pi, 0.0, 0.0, 1.0]),
            "action_jump",
            "action/abs[:, 0:3]",
            r"the target position jumps [\d.]+ m/s between frames \d+ and \d+, beyond "
            r"data.checks.max_target_speed_m_s=3.0",
        ),
        (
            ("set_joint", 7, 3, 0.5),
            "joint_limits",
            "obs/robot_obs[:, 10]",
            r"joint 4 is 0.5 rad at frame \d+, outside data.checks.joint_min/joint_max \[-3.0718, -0.0698\]",
        ),
        (
            ("stamp_back", "gripper", 9, 0.2),
            "non_monotonic_stamps",
            "/camera/gripper/image_raw",
            r"topic '/camera/gripper/image_raw': message 9 is stamped -0.167 s before the one before it",
        ),
    ],
)
def test_implausible_recordings_are_quarantined_with_the_check_that_failed(tmp_path, tweak, check, stream, reason):
    import bagfactory

    cfg = _quarantine_cfg(tmp_path)
    write_arm_bag(tmp_path / "raw" / "good")
    write_arm_bag(tmp_path / "raw" / "bad", tweak=getattr(bagfactory, tweak[0])(*tweak[1:]))
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["good"]
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["episode"], entry["check"], entry["stream"]) == ("bad", "bad", check, stream)
    assert re.search(reason, entry["reason"]), entry["reason"]
    assert report["summary"]["quarantined"] == {check: 1}


def test_checks_are_configurable(tmp_path):
    """A bound set to null is not checked; a looser bound admits what the default rejects; stamps going back
    are sorted when data.checks.monotonic_stamps is false (the earlier behaviour)."""
    from bagfactory import chain, set_joint, stamp_back

    cfg = _quarantine_cfg(
        tmp_path, "data.checks.joint_min=null", "data.checks.joint_max=null", "data.checks.monotonic_stamps=false"
    )
    write_arm_bag(tmp_path / "raw" / "odd", tweak=chain(set_joint(7, 3, 0.5), stamp_back("gripper", 9, 0.05)))
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["odd"] and report["quarantined"] == []


def test_check_config_is_validated_at_once(tmp_path):
    from conftest import tiny_config

    with pytest.raises(Exception, match="data.checks.max_abs_position_m must be > 0 or null"):
        tiny_config(tmp_path, "data.checks.max_abs_position_m=0")
    with pytest.raises(Exception, match="data.checks.joint_min/joint_max hold 2 limits, data.arm_joint_names 7 joints"):
        tiny_config(tmp_path, "data.checks.joint_min=[-1,-1]", "data.checks.joint_max=[1,1]")


def test_report_summary_counts_recordings_episodes_frames_and_reasons(tmp_path):
    from bagfactory import set_joint

    cfg = _quarantine_cfg(tmp_path)
    write_arm_bag(tmp_path / "raw" / "good", n_frames=24)
    write_arm_bag(tmp_path / "raw" / "nan", tweak=set_joint(5, 2, float("nan")))
    (tmp_path / "raw" / "notes.txt").write_text("hello")
    summary = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)["summary"]
    assert summary == {
        "recordings": 3,
        "episodes": 1,
        "frames": 24,
        "hours": round(24 / 30 / 3600, 4),
        "quarantined": {"non_finite": 1, "unknown_format": 1},
    }


def _same_data(a, b) -> None:
    for name in ("time", "rgb_static", "rgb_gripper", "robot_obs", "scene_obs", "action_abs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.instruction, a.task) == (b.instruction, b.task)


def test_db3_without_metadata_is_read_from_its_own_topics_table(cfg, tmp_path):
    """A crashed recorder leaves the .db3 without metadata.yaml: read it (directory or lone file), without
    writing into the recording, with the configured typestore where the database has no definitions.
    A lone .mcap file is read the same way."""
    from bagfactory import strip_to_database

    write_arm_bag(tmp_path / "ref" / "whole", seed=3)
    write_arm_bag(tmp_path / "raw" / "crashed", seed=3)
    write_arm_bag(tmp_path / "raw" / "nodefs", seed=3)
    db = strip_to_database(write_arm_bag(tmp_path / "tmp" / "lone", seed=3))
    db.rename(tmp_path / "raw" / "lone.db3")
    mcap = write_arm_bag(tmp_path / "tmp" / "single", seed=3, storage="mcap")
    next(mcap.glob("*.mcap")).rename(tmp_path / "raw" / "single.mcap")  # one mcap file, as some tools write
    strip_to_database(tmp_path / "raw" / "crashed")
    strip_to_database(tmp_path / "raw" / "nodefs", keep_definitions=False)
    before = sorted(str(p) for p in (tmp_path / "raw").rglob("*"))
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    assert sorted(report["episodes"]) == ["crashed", "lone", "nodefs", "single"]
    assert sorted(str(p) for p in (tmp_path / "raw").rglob("*")) == before  # nothing written beside the recording
    ingest(tmp_path / "ref", tmp_path / "ref_episodes", cfg.data)
    whole = read_episode(tmp_path / "ref_episodes" / "whole.h5")
    for name in ("crashed", "lone", "nodefs", "single"):
        _same_data(read_episode(tmp_path / "episodes" / f"{name}.h5"), whole)


def test_db3_without_definitions_needs_the_right_typestore(tmp_path):
    from bagfactory import strip_to_database

    cfg = _quarantine_cfg(tmp_path, "data.typestore=empty")
    write_arm_bag(tmp_path / "raw" / "good")
    strip_to_database(write_arm_bag(tmp_path / "raw" / "nodefs"), keep_definitions=False)
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["good"]  # its definitions are in the bag, the typestore is not needed
    [entry] = report["quarantined"]
    assert entry["recording"] == "nodefs" and entry["check"] == "unknown_type", entry
    assert "the bag holds no definition of sensor_msgs/msg/Image and data.typestore 'empty' has none" in entry["reason"]


def test_truncated_db3_without_metadata_is_quarantined_naming_the_recording(tmp_path):
    from bagfactory import strip_to_database

    cfg = _quarantine_cfg(tmp_path)
    write_arm_bag(tmp_path / "raw" / "good")
    db = strip_to_database(write_arm_bag(tmp_path / "raw" / "cut"))
    db.write_bytes(db.read_bytes()[:3000])
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["good"]
    [entry] = report["quarantined"]
    assert entry["recording"] == "cut" and entry["check"] == "unreadable", entry
    assert entry["reason"].startswith("not a readable rosbag2 recording")


def test_ros1_bag_is_read_like_its_ros2_twin(cfg, tmp_path):
    """A ROS1 .bag (written by rosbags' converter from the same episode) gives the same episode data."""
    from bagfactory import write_ros1_bag

    write_arm_bag(tmp_path / "ref" / "twin", seed=4, compressed="png")
    (tmp_path / "raw").mkdir()
    write_ros1_bag(tmp_path / "raw" / "twin.bag", seed=4, compressed="png")
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    assert list(report["episodes"]) == ["twin"]
    ingest(tmp_path / "ref", tmp_path / "ref_episodes", cfg.data)
    ros1 = read_episode(tmp_path / "episodes" / "twin.h5")
    assert ros1.source_format == "rosbag1"
    _same_data(ros1, read_episode(tmp_path / "ref_episodes" / "twin.h5"))


def test_split_db3_files_without_metadata_are_one_recording(cfg, tmp_path):
    """A recorder that splits by size and then crashes leaves <name>_0.db3, <name>_1.db3 ... and no
    metadata.yaml: they are read together, in split order, as one episode."""
    from bagfactory import strip_to_database

    def first(key, k, t, msg):
        return (t, msg) if k < 12 else None

    def second(key, k, t, msg):
        return (t, msg) if k >= 12 and key != "instruction" else None

    write_arm_bag(tmp_path / "ref" / "rec", seed=5)
    (tmp_path / "raw" / "rec").mkdir(parents=True)
    for i, part in enumerate((first, second)):
        db = strip_to_database(write_arm_bag(tmp_path / "parts" / f"p{i}", seed=5, tweak=part))
        db.rename(tmp_path / "raw" / "rec" / f"rec_{i}.db3")
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg.data)
    assert list(report["episodes"]) == ["rec"] and report["episodes"]["rec"]["frames"] == 24
    ingest(tmp_path / "ref", tmp_path / "ref_episodes", cfg.data)
    _same_data(read_episode(tmp_path / "episodes" / "rec.h5"), read_episode(tmp_path / "ref_episodes" / "rec.h5"))
