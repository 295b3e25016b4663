"""A corpus of broken recordings, written with rosbags and h5py, mixed with good ones.

Each broken recording has its expected outcome (check, stream, reason); in quarantine mode every one is
reported with it and nothing good is lost: the good episodes come out byte for byte as in a run without
the broken files. In error mode each one alone stops ingest with one line naming it, never a traceback.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from bagfactory import (
    JOINTS,
    chain,
    drop,
    rename_joints,
    resize_camera,
    set_action,
    set_array,
    set_instruction,
    set_joint,
    stamp_back,
    strip_to_database,
    write_arm_bag,
    write_custom_msg_bag,
)
from h5factory import ALOHA_POSE_OVERRIDES, write_aloha, write_robomimic

from vlaops.data.ingest import REPORT_FILE, ingest
from vlaops.errors import VlaopsError

SETTINGS = ["data.on_bad_input=quarantine", *ALOHA_POSE_OVERRIDES, "data.hdf5.robomimic.instruction=lift the cube"]
GOOD_POSE = [0.4, -0.1, 0.3, math.pi, 0.0, 0.0, 1.0]


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _bag(**kwargs) -> Callable[[Path], None]:
    return lambda path: write_arm_bag(path, **kwargs)


def _truncated_db3(path: Path) -> None:
    write_arm_bag(path)
    _truncate(next(path.glob("*.db3")), 4000)


def _bad_metadata(path: Path) -> None:
    write_arm_bag(path)
    (path / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed\n")


def _truncated_lone_db3(path: Path) -> None:
    db = strip_to_database(write_arm_bag(path.parent / ".work" / path.stem))
    _truncate(db, 4000)
    db.rename(path)


def _bad_sidecar(path: Path) -> None:
    write_arm_bag(path)
    (path / "instruction.json").write_text('{"instruction": "open the')


def _unknown_layout(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("foo", data=np.zeros(3))


def _truncated_hdf5(path: Path) -> None:
    write_aloha(path)
    _truncate(path, 1500)


# name in raw/ -> (writer, check, stream or None, regex on the reason)
BROKEN: dict[str, tuple[Callable[[Path], None], str, str | None, str]] = {
    "b01_resized_camera": (
        _bag(tweak=resize_camera(10, 48)),
        "frame_size",
        "/camera/static/image_raw",
        r"frame size changes mid-episode, from \(64, 64, 3\) to \(48, 48, 3\) at message 10",
    ),
    "b02_action_1e30": (
        _bag(tweak=set_action(12, [1e30, 0, 0.3, math.pi, 0, 0, 1])),
        "position_bound",
        "action/abs[:, 0]",
        r"1e\+30 m at frame \d+, beyond data.checks.max_abs_position_m",
    ),
    "b03_action_euler_40rad": (
        _bag(tweak=set_action(12, [0.4, -0.12, 0.3, 40.0, 0, 0, 1])),
        "angle_bound",
        "action/abs[:, 3]",
        r"40 rad at frame \d+, beyond data.checks.max_abs_angle_rad",
    ),
    "b04_action_jump": (
        _bag(tweak=set_action(12, [0.4, -0.5, 0.3, math.pi, 0, 0, 1])),
        "action_jump",
        "action/abs[:, 0:3]",
        r"the target position jumps [\d.]+ m/s",
    ),
    "b05_target_far_from_tcp": (
        _bag(tweak=chain(*(set_action(k, [0.4, -1.0, 0.3, math.pi, 0, 0, 1]) for k in range(24)))),
        "action_offset",
        "action/abs[:, 0:3]",
        r"the target position is [\d.]+ m from the TCP",
    ),
    "b06_joint_past_limit": (
        _bag(tweak=set_joint(7, 3, 0.5)),
        "joint_limits",
        "obs/robot_obs[:, 10]",
        r"joint 4 is 0.5 rad at frame \d+, outside data.checks.joint_min/joint_max",
    ),
    "b07_nan_joint": (
        _bag(tweak=set_joint(5, 2, float("nan"))),
        "non_finite",
        "obs/robot_obs",
        r"^field 'obs/robot_obs' expected finite values, got NaN or inf$",
    ),
    "b08_inf_scene": (
        _bag(tweak=set_array("scene", 6, [float("inf")] * 24)),
        "non_finite",
        "obs/scene_obs",
        r"field 'obs/scene_obs' expected finite values",
    ),
    "b09_stamps_back": (
        _bag(tweak=stamp_back("tcp", 9, 0.2)),
        "non_monotonic_stamps",
        "/tcp_pose",
        r"topic '/tcp_pose': message 9 is stamped -0.167 s before the one before it",
    ),
    "b10_action_length_changes": (
        _bag(tweak=set_action(5, [0.0] * 6)),
        "wrong_shape",
        "/action",
        r"topic '/action': array shape changes mid-episode, from \(7,\) to \(6,\) at message 5",
    ),
    "b11_no_static_camera": (
        _bag(omit=("static",)),
        "missing_stream",
        "/camera/static/image_raw",
        r"mapped topic '/camera/static/image_raw' \(data.topics.rgb_static\) is not in the bag",
    ),
    "b12_empty": (_bag(empty=True), "empty", None, r"^the bag has no messages$"),
    "b13_broken_png": (
        _bag(compressed="broken"),
        "undecodable_image",
        "/camera/static/image_raw",
        r"topic '/camera/static/image_raw': cannot decode the compressed image",
    ),
    "b14_10hz": (_bag(hz=10.0), "wrong_rate", "/action", r"topic '/action' runs at 10.0 Hz, data.control_hz is 30"),
    "b15_short": (_bag(n_frames=4), "too_short", None, r"4 synchronised frames, data.min_episode_len is 8"),
    "b16_camera_drops_out": (
        _bag(tweak=drop("static", 8, 14)),
        "out_of_sync",
        "/camera/static/image_raw",
        r"stream '/camera/static/image_raw' is \d+ ms old at tick",
    ),
    "b17_other_joint_names": (
        _bag(tweak=rename_joints([f"j{i}" for i in range(len(JOINTS))])),
        "missing_joints",
        "/joint_states",
        r"topic '/joint_states': joints \['panda_joint1'",
    ),
    "b18_truncated_db3": (_truncated_db3, "unreadable", None, r"^not a readable rosbag2 recording"),
    "b19_bad_metadata_yaml": (_bad_metadata, "unreadable", None, r"^not a readable rosbag2 recording"),
    "b20_truncated_lone.db3": (_truncated_lone_db3, "unreadable", None, r"^not a readable rosbag2 recording"),
    "b21_blank_instruction": (
        _bag(tweak=set_instruction("   ")),
        "episode_contract",
        "instruction",
        r"field 'instruction' expected a non-empty instruction",
    ),
    "b22_malformed_sidecar": (
        _bad_sidecar,
        "bad_sidecar",
        "b22_malformed_sidecar/instruction.json",
        r"^sidecar 'b22_malformed_sidecar/instruction.json': not valid JSON",
    ),
    "b23_own_message_types": (
        lambda p: write_custom_msg_bag(p, definitions="standard"),
        "wrong_type",
        "/joint_states",
        r"has type my_pkg/msg/ArmState, expected sensor_msgs/msg/JointState \(or set data.fields",
    ),
    "h01_aloha_bimanual_joints.hdf5": (
        lambda p: write_aloha(p, pose=False),
        "missing_stream",
        "observations/ee_pos",
        r"key 'observations/ee_pos' \(data.hdf5.aloha.tcp_pos\) is not in the file",
    ),
    "h02_aloha_nan_qpos.hdf5": (
        lambda p: write_aloha(p, break_="nan_qpos"),
        "non_finite",
        "obs/robot_obs",
        r"field 'obs/robot_obs' expected finite values",
    ),
    "h03_aloha_short_action.hdf5": (
        lambda p: write_aloha(p, break_="short_action"),
        "wrong_shape",
        None,
        r"streams of different lengths: .*'action': 17",
    ),
    "h04_aloha_corrupt_jpeg.hdf5": (
        lambda p: write_aloha(p, compressed=True, break_="corrupt_jpeg"),
        "undecodable_image",
        "observations/images/top",
        r"key 'observations/images/top' frame 5: cannot decode the compressed image",
    ),
    "h05_aloha_uint16_images.hdf5": (
        lambda p: write_aloha(p, break_="uint16_images"),
        "wrong_shape",
        "observations/images/top",
        r"holds uint16, expected uint8 images",
    ),
    "h06_aloha_no_instruction.hdf5": (
        lambda p: write_aloha(p, instruction=None),
        "no_instruction",
        None,
        r"no instruction: the file has no 'instruction' attr and data.hdf5.aloha.instruction is null",
    ),
    "h07_unknown_layout.h5": (_unknown_layout, "unknown_layout", None, r"an HDF5 file in no layout vlaops reads"),
    "h08_truncated.hdf5": (_truncated_hdf5, "unreadable", None, r"^not a readable HDF5 file"),
    "x01_notes.txt": (lambda p: p.write_text("hello"), "unknown_format", None, r"^not a recording vlaops can read"),
}
# a robomimic file with two good demos and two bad ones: the bad ones are reported alone
MIXED_DEMOS = ("r01_lift.hdf5", {1: "nan_action", 3: "huge_action"})
MIXED_EXPECTED = [("demo_1", "non_finite", "action/abs"), ("demo_3", "position_bound", "action/abs[:, 0]")]


def _write_good(raw: Path) -> None:
    write_arm_bag(raw / "g01_sqlite", seed=1)
    write_arm_bag(raw / "g02_mcap", seed=2, storage="mcap", instruction="lift the blue block")
    write_arm_bag(raw / "g03_png", seed=3, compressed="png")
    write_aloha(raw / "g04_aloha.hdf5", compressed=True)
    write_robomimic(raw / "g05_lift.hdf5", n_demos=2, control_freq=30)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """raw_clean (good recordings only) and raw_mixed (the same good recordings, same paths' names, plus
    every broken one), and a copy of a good episode under another name (a duplicate episode id)."""
    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw"
    _write_good(raw)
    clean = root / "clean_raw"
    shutil.copytree(raw, clean, symlinks=True)
    for name, (write, *_expected) in BROKEN.items():
        write(raw / name)
    shutil.rmtree(raw / ".work", ignore_errors=True)
    write_robomimic(raw / MIXED_DEMOS[0], n_demos=4, control_freq=30, broken=MIXED_DEMOS[1])
    return {"root": root, "raw": raw, "clean": clean}


def _config(root: Path, *extra: str):
    from conftest import tiny_config

    return tiny_config(root, *SETTINGS, *extra).data


def test_corpus_has_twenty_or_more_broken_recordings():
    assert len(BROKEN) + len(MIXED_EXPECTED) >= 20


@pytest.mark.slow  # seconds: the full suite only (the quick loop stays under 5 minutes)
def test_every_broken_recording_is_quarantined_with_its_reason_and_good_episodes_are_byte_identical(corpus):
    root, raw = corpus["root"], corpus["raw"]
    # the good recordings alone, read from the same paths as in the mixed run (provenance holds the path)
    moved = root / "raw_aside"
    raw.rename(moved)
    shutil.copytree(corpus["clean"], raw)
    clean = ingest(raw, root / "out_clean", _config(root))
    shutil.rmtree(raw)
    moved.rename(raw)
    assert clean["quarantined"] == []
    good_ids = ["g01_sqlite", "g02_mcap", "g03_png", "g04_aloha", "g05_lift_demo_0", "g05_lift_demo_1"]
    assert list(clean["episodes"]) == good_ids

    mixed = ingest(raw, root / "out_mixed", _config(root))
    got = {q["recording"]: q for q in mixed["quarantined"]}
    for name, (_write, check, stream, reason) in BROKEN.items():
        assert name in got, f"{name}: not quarantined (episodes: {list(mixed['episodes'])})"
        entry = got[name]
        assert (entry["check"], entry["stream"]) == (check, stream), (name, entry)
        assert re.search(reason, entry["reason"]), (name, entry["reason"])
        assert "\n" not in entry["reason"] and ".tmp-" not in entry["reason"]
    demos = [(q["episode"], q["check"], q["stream"]) for q in mixed["quarantined"] if q["recording"] == MIXED_DEMOS[0]]
    assert demos == MIXED_EXPECTED
    assert len(mixed["quarantined"]) == len(BROKEN) + len(MIXED_EXPECTED)
    assert list(mixed["episodes"]) == [*good_ids, "r01_lift_demo_0", "r01_lift_demo_2"]
    for episode_id in good_ids:
        name = f"{episode_id}.h5"
        assert (root / "out_mixed" / name).read_bytes() == (root / "out_clean" / name).read_bytes(), name
    summary = json.loads((root / "out_mixed" / REPORT_FILE).read_text())["summary"]
    assert summary["recordings"] == len(BROKEN) + 6 and summary["episodes"] == len(good_ids) + 2
    assert sum(summary["quarantined"].values()) == len(mixed["quarantined"])


def test_duplicate_episode_id_in_the_corpus(corpus, tmp_path):
    """A canonical copy of a good episode beside its recording: the second is quarantined, the first kept."""
    raw = tmp_path / "raw"
    shutil.copytree(corpus["clean"] / "g01_sqlite", raw / "g01_sqlite")
    first = ingest(raw, tmp_path / "first", _config(tmp_path))
    shutil.copy(tmp_path / "first" / "g01_sqlite.h5", raw / "zz_copy.h5")
    report = ingest(raw, tmp_path / "second", _config(tmp_path))
    assert list(report["episodes"]) == list(first["episodes"]) == ["g01_sqlite"]
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["episode"], entry["check"]) == ("zz_copy.h5", "zz_copy", "duplicate_episode_id")
    assert entry["reason"] == "episode id 'g01_sqlite' is already taken by another recording"


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_error_mode_is_one_line_per_broken_recording(corpus, tmp_path, name):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / name).symlink_to(corpus["raw"] / name)
    cfg = _config(tmp_path, "data.on_bad_input=error")
    with pytest.raises(VlaopsError) as info:
        ingest(raw, tmp_path / "episodes", cfg)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{raw / name}: "), line
    assert re.search(BROKEN[name][3].lstrip("^"), line), line
    assert not (tmp_path / "episodes").exists()


def test_workers_do_not_change_a_byte(corpus, tmp_path):
    """Two worker processes give the same episodes, report and quarantine order as one."""
    one = ingest(corpus["raw"], tmp_path / "one", _config(tmp_path, "data.num_workers=1"))
    two = ingest(corpus["raw"], tmp_path / "two", _config(tmp_path, "data.num_workers=2"))
    assert one == two and len(one["quarantined"]) == len(BROKEN) + len(MIXED_EXPECTED)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert not [f for f in files if f.startswith(".")]  # no part file left
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
