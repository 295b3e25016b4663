"""ingest: rosbag2 recordings written with rosbags -> canonical episodes; bad input named and not kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bagfactory import write_arm_bag

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
    np.testing.assert_allclose(ep.robot_obs[:, 7], np.linspace(-0.5, 0.5, 7)[0] + 0.01 * np.arange(20))
    assert ep.robot_obs.shape == (20, 15) and ep.scene_obs.shape == (20, 24)
    np.testing.assert_allclose(ep.robot_obs[:, 6], 0.08)  # gripper width = both fingers
    np.testing.assert_allclose(ep.robot_obs[1:, 14], ep.action_abs[:-1, 6])  # previous gripper command
    assert ep.instruction == "push the red block to the left" and ep.task == "push_the_red_block_to_the_left"
    assert json.loads((out / REPORT_FILE).read_text())["quarantined"] == {}


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
    with pytest.raises(VlaopsError, match=r"nocam: mapped topic '/camera/static/image_raw' \(data.topics.rgb_static\) is not in the bag"):
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
    assert "data.topics.rgb_static" in report["quarantined"]["nocam"]
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
