"""ingest of ROS recordings from rigs unlike the simulator's: the TCP pose on /tf, a team's own message
types in bags without definitions, the instruction from a sidecar or a default, one long recording cut
into episodes. Every bag is written with the real ``rosbags`` writer (tests/bagfactory.py)."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest
from bagfactory import (
    CUSTOM_MSGS,
    TF_STATIC,
    drop,
    strip_to_database,
    tf_link7,
    write_arm_bag,
    write_custom_msg_bag,
    write_long_bag,
    write_tf_bag,
)
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from vlaops.data.ingest import ingest
from vlaops.errors import VlaopsError
from vlaops.io.episode import read_episode

SMALL = {"static_size": 16, "gripper_size": 8}  # tiny frames: these tests are about the numbers around them


def ros_config(tmp_path, *overrides: str, **data):
    """The real conf/ composed and shrunk like ``conftest.tiny_config``, with ``data.<key>=value`` set on the
    composed tree (a dict keyed by message type names, which Hydra's override grammar cannot spell) and
    then validated as any config is."""
    from conftest import CONF, SHRINK_MODEL, path_overrides

    from vlaops.config import compose, validate

    raw = compose([*path_overrides(tmp_path), *SHRINK_MODEL, *overrides], CONF)
    for key, value in data.items():
        OmegaConf.update(raw, f"data.{key}", value, merge=False)
    return validate(raw, "conf").data


def _same_data(a, b, skip: tuple[str, ...] = ()) -> None:
    np.testing.assert_allclose(a.time, b.time, atol=1e-6)
    for name in ("rgb_static", "rgb_gripper", "robot_obs", "scene_obs", "action_abs"):
        if name not in skip:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _reference(tmp_path, name: str = "ref", **kwargs):
    """The episode of write_arm_bag(**kwargs) as the simulator's topics give it."""
    from conftest import tiny_config

    write_arm_bag(tmp_path / "ref_raw" / name, **kwargs)
    ingest(tmp_path / "ref_raw", tmp_path / "ref_episodes", tiny_config(tmp_path).data)
    return read_episode(tmp_path / "ref_episodes" / f"{name}.h5")


# ---- the TCP pose from /tf ---------------------------------------------------------------------------
def _matrix(xyz, quat) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_quat(quat).as_matrix()  # scipy: quaternions are (x, y, z, w) too
    out[:3, 3] = xyz
    return out


def _expected_tcp(base: str, n: int) -> np.ndarray:
    """(n, 6) xyz + extrinsic xyz euler of panda_hand_tcp in ``base``, composed here with scipy."""
    s = {key: _matrix(*value) for key, value in TF_STATIC.items()}
    hand_tcp = s[("panda_link7", "panda_hand")] @ s[("panda_hand", "panda_hand_tcp")]
    base_link0 = np.eye(4) if base == "panda_link0" else np.linalg.inv(s[("world", base)]) @ s[("world", "panda_link0")]
    poses = [base_link0 @ _matrix(*tf_link7(k)) @ hand_tcp for k in range(n)]
    return np.array([np.concatenate([p[:3, 3], Rotation.from_matrix(p[:3, :3]).as_euler("xyz")]) for p in poses])


TF_SETTINGS = (
    "data.tcp_source=tf",
    "data.tf.tool_frame=panda_hand_tcp",
    "data.checks.max_target_offset_m=null",
)  # the synthetic arm's tf is not where its commands point


@pytest.mark.parametrize("base", ["panda_link0", "table"])
def test_tcp_pose_from_tf_is_the_composed_chain(tmp_path, base):
    """panda_link0 -> link7 moving on /tf, link7 -> hand -> tcp static on /tf_static; 'table' is reached
    through the common ancestor 'world'. The rest of the episode is what the PoseStamped bag gives."""
    write_tf_bag(tmp_path / "raw" / "tfbag", n_frames=14, seed=7, **SMALL)
    cfg = ros_config(tmp_path, *TF_SETTINGS, f"data.tf.base_frame={base}")
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["tfbag"] and report["quarantined"] == []
    ep = read_episode(tmp_path / "episodes" / "tfbag.h5")
    expected = _expected_tcp(base, 14)
    np.testing.assert_allclose(ep.robot_obs[:, :3], expected[:, :3], atol=1e-9)
    np.testing.assert_allclose(ep.robot_obs[:, 3:6], expected[:, 3:6], atol=1e-9)
    ref = _reference(tmp_path, n_frames=14, seed=7, **SMALL)
    np.testing.assert_array_equal(ep.robot_obs[:, 6:], ref.robot_obs[:, 6:])
    _same_data(ep, ref, skip=("robot_obs",))


@pytest.mark.parametrize(
    "bag, overrides, check, reason",
    [
        (
            dict(),
            ("data.tf.tool_frame=panda_hand_tpc",),
            "missing_tf_frame",
            r"frame 'panda_hand_tpc' \(data.tf.tool_frame\) is in no transform published on '/tf' / '/tf_static'; "
            r"frames present: \['camera_link', 'panda_hand', 'panda_hand_tcp'",
        ),
        (
            dict(static={k: v for k, v in TF_STATIC.items() if k[1] != "panda_hand_tcp"}),
            (),
            "missing_tf_frame",
            r"frame 'panda_hand_tcp' \(data.tf.tool_frame\) is in no transform",
        ),
        (
            dict(tool_parent="base_footprint"),
            (),
            "no_tf_chain",
            r"no chain of transforms from 'panda_link0' \(data.tf.base_frame\) to 'panda_hand_tcp' "
            r"\(data.tf.tool_frame\) "
            r"on '/tf' / '/tf_static': 'panda_link0' is under 'world', 'panda_hand_tcp' under 'base_footprint'",
        ),
        (dict(tf_until=8), (), "out_of_sync", r"stream '/tf 'panda_link0' -> 'panda_link7'' is \d+ ms old at tick"),
    ],
)
def test_tf_problems_name_the_frames(tmp_path, bag, overrides, check, reason):
    """Quarantined with the check, the /tf topic as the stream and the frames in the reason; in error mode
    the same reason is the one line ingest stops with."""
    write_tf_bag(tmp_path / "raw" / "tfbag", n_frames=12, **SMALL, **bag)
    settings = (*TF_SETTINGS, "data.tf.base_frame=panda_link0", *overrides)
    with pytest.raises(VlaopsError) as info:
        ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, *settings))
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'raw' / 'tfbag'}: ") and re.search(reason, line), line
    write_tf_bag(tmp_path / "raw" / "fine", n_frames=12, **SMALL)
    quarantine = ros_config(tmp_path, "data.on_bad_input=quarantine", *settings)
    if overrides:  # a misspelt frame is wrong for every bag, the good one too
        with pytest.raises(VlaopsError, match=r"no recording could be ingested; reasons: fine: frame 'panda_hand_tpc'"):
            ingest(tmp_path / "raw", tmp_path / "episodes", quarantine)
        return
    report = ingest(tmp_path / "raw", tmp_path / "episodes", quarantine)
    assert list(report["episodes"]) == ["fine"]
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["check"], entry["stream"]) == ("tfbag", check, "/tf"), entry


def test_bag_without_tf_is_named_and_the_tf_bags_kept(tmp_path):
    write_tf_bag(tmp_path / "raw" / "a_tf", n_frames=12, **SMALL)
    write_arm_bag(tmp_path / "raw" / "b_pose_only", n_frames=12, **SMALL)
    cfg = ros_config(tmp_path, "data.on_bad_input=quarantine", *TF_SETTINGS, "data.tf.base_frame=panda_link0")
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["a_tf"]
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["check"], entry["stream"]) == ("b_pose_only", "missing_stream", "/tf")
    assert entry["reason"].startswith("mapped topic '/tf' (data.tf.topic) is not in the bag")


def test_tf_source_needs_both_frames(tmp_path):
    with pytest.raises(
        VlaopsError,
        match=r"data.tcp_source is 'tf': data.tf.base_frame and data.tf.tool_frame must "
        r"name the frames, got None and 'panda_hand_tcp'",
    ):
        ros_config(tmp_path, "data.tcp_source=tf", "data.tf.tool_frame=panda_hand_tcp")
    with pytest.raises(VlaopsError, match=r"data.tcp_source must be one of \('pose', 'tf'\), got 'tff'"):
        ros_config(tmp_path, "data.tcp_source=tff")


# ---- a team's own message types, bags without definitions -------------------------------------------
OWN_FIELDS = {"fields": {"action": ["target", "gripper"], "joint_states": ["q", "fingers.left", "fingers.right"]}}


@pytest.mark.parametrize(
    "definitions, lone_db3", [("none", False), ("standard", False), ("all", False), ("none", True)]
)
def test_own_message_types_are_read_from_the_config_definitions(tmp_path, definitions, lone_db3):
    """/action as my_pkg/msg/ArmCommand and /joint_states as my_pkg/msg/ArmState, in a bag with no
    definitions (an old recorder; also a .db3 without metadata.yaml), with the standard ones only (the
    recorder lacked the team's package) or with all: data.custom_msgs + data.fields read each to the
    same episode as the standard messages."""
    bag = write_custom_msg_bag(tmp_path / "raw" / "own", definitions=definitions, n_frames=12, seed=2, **SMALL)
    if lone_db3:
        strip_to_database(bag).rename(tmp_path / "raw" / "own.db3")
        bag.rmdir()
    report = ingest(
        tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, custom_msgs=CUSTOM_MSGS, **OWN_FIELDS)
    )
    assert list(report["episodes"]) == ["own"]
    _same_data(read_episode(tmp_path / "episodes" / "own.h5"), _reference(tmp_path, n_frames=12, seed=2, **SMALL))


def test_own_message_types_without_their_definition_are_named(tmp_path):
    write_custom_msg_bag(tmp_path / "raw" / "own", definitions="standard", n_frames=12, **SMALL)
    with pytest.raises(
        VlaopsError,
        match=r"own: topic '/joint_states' \(data.topics.joint_states\) has type "
        r"my_pkg/msg/ArmState, expected sensor_msgs/msg/JointState \(or set "
        r"data.fields.joint_states for a custom type\)",
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path))
    with pytest.raises(
        VlaopsError,
        match=r"own: topic '/joint_states' \(data.topics.joint_states\): the bag holds no "
        r"definition of my_pkg/msg/ArmState and data.typestore 'ros2_humble' has "
        r"none, nor data.custom_msgs",
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, **OWN_FIELDS))
    fields = {"fields": {"action": ["target", "grip"], "joint_states": OWN_FIELDS["fields"]["joint_states"]}}
    with pytest.raises(
        VlaopsError,
        match=r"own: topic '/action': my_pkg/msg/ArmCommand has no field 'grip' "
        r"\(data.fields.action\); its fields: \['header', 'target', 'gripper'\]",
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, custom_msgs=CUSTOM_MSGS, **fields))
    fields = {"fields": {"action": ["target", "gripper"], "joint_states": ["q", "fingers.left"]}}
    with pytest.raises(
        VlaopsError,
        match=r"own: topic '/joint_states': data.fields.joint_states gives 8 values, "
        r"expected 9",
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, custom_msgs=CUSTOM_MSGS, **fields))


@pytest.mark.parametrize(
    "msgs, reason",
    [
        (
            {"my_pkg/msg/ArmCommand": "float64[6 target\nfloat64 gripper\n"},
            r"^conf: data.custom_msgs\['my_pkg/msg/ArmCommand'\]: not a valid .msg definition \(cannot parse ",
        ),
        (
            {"my_pkg/msg/ArmState": "float64[7] q\nFingers fingers\n"},
            r"^conf: data.custom_msgs\['my_pkg/msg/ArmState'\]: field 'fingers' has type my_pkg/msg/Fingers, which "
            r"neither "
            r"data.custom_msgs nor data.typestore defines$",
        ),
        (
            {"ArmCommand": "float64 x\n"},
            r"data.custom_msgs\['ArmCommand'\]: a message type is named <package>/msg/<Name>",
        ),
        (
            {"std_msgs/msg/String": "int32 data\n"},
            r"^conf: data.custom_msgs: Type 'std_msgs/msg/String' is already present with different definition",
        ),
    ],
)
def test_bad_msg_text_is_one_line_naming_the_key(tmp_path, msgs, reason):
    with pytest.raises(VlaopsError) as info:
        ros_config(tmp_path, custom_msgs=msgs)
    line = str(info.value)
    assert "\n" not in line and re.search(reason, line), line


def test_bag_without_embedded_definitions_is_read_with_the_typestore(tmp_path):
    """A rosbag2 directory whose metadata.yaml is there but whose database holds no message definitions
    (rosbag2 before Iron): read with data.typestore; with a store that lacks the types, named."""
    write_arm_bag(tmp_path / "raw" / "old", n_frames=12, seed=1, **SMALL)
    [db] = (tmp_path / "raw" / "old").glob("*.db3")
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM message_definitions")
    con.close()
    ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path))
    _same_data(read_episode(tmp_path / "episodes" / "old.h5"), _reference(tmp_path, n_frames=12, seed=1, **SMALL))
    with pytest.raises(
        VlaopsError,
        match=r"old: topic '/camera/static/image_raw' \(data.topics.rgb_static\): the bag "
        r"holds no definition of sensor_msgs/msg/Image and data.typestore 'empty'",
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes2", ros_config(tmp_path, "data.typestore=empty"))


# ---- the instruction from a sidecar or a default ----------------------------------------------------
def test_instruction_from_sidecar_or_default_topic_first(tmp_path):
    """topic > sidecar (<bag>.json beside it, or instruction.json inside) > data.default_instruction; the
    sidecar's task is used when no task topic gives one. A sidecar is not a recording of its own."""
    raw = tmp_path / "raw"
    write_arm_bag(raw / "a_beside", n_frames=10, omit=("instruction",), **SMALL)
    (raw / "a_beside.json").write_text(json.dumps({"instruction": "open the drawer", "task": "open_drawer"}))
    write_arm_bag(raw / "b_inside", n_frames=10, omit=("instruction",), **SMALL)
    (raw / "b_inside" / "instruction.json").write_text(json.dumps({"instruction": " turn on the led "}))
    write_arm_bag(raw / "c_topic", n_frames=10, instruction="lift the blue block", **SMALL)
    (raw / "c_topic.json").write_text(json.dumps({"instruction": "open the drawer", "task": "lift_blue"}))
    write_arm_bag(raw / "d_default", n_frames=10, omit=("instruction",), **SMALL)
    db = strip_to_database(write_arm_bag(tmp_path / "tmp" / "e_lone", n_frames=10, omit=("instruction",), **SMALL))
    db.rename(raw / "e_lone.db3")
    (raw / "e_lone.json").write_text(json.dumps({"instruction": "push the red block to the left"}))
    report = ingest(raw, tmp_path / "episodes", ros_config(tmp_path, "data.default_instruction=stack the blocks"))
    got = {k: (v["instruction"], v["task"]) for k, v in report["episodes"].items()}
    assert got == {
        "a_beside": ("open the drawer", "open_drawer"),
        "b_inside": ("turn on the led", "turn_on_the_led"),
        "c_topic": ("lift the blue block", "lift_blue"),
        "d_default": ("stack the blocks", "stack_the_blocks"),
        "e_lone": ("push the red block to the left", "push_the_red_block_to_the_left"),
    }
    assert report["summary"]["recordings"] == 5 and report["quarantined"] == []
    assert read_episode(tmp_path / "episodes" / "a_beside.h5").instruction == "open the drawer"


def test_no_instruction_anywhere_is_named(tmp_path):
    write_arm_bag(tmp_path / "raw" / "mute", n_frames=10, omit=("instruction",), **SMALL)
    (tmp_path / "raw" / "notes.json").write_text("{}")  # no recording's sidecar: an unknown entry, as before
    report = ingest(
        tmp_path / "raw",
        tmp_path / "episodes",
        ros_config(tmp_path, "data.on_bad_input=quarantine", "data.default_instruction=x"),
    )
    assert [(q["recording"], q["check"]) for q in report["quarantined"]] == [("notes.json", "unknown_format")]
    with pytest.raises(
        VlaopsError, match=r"mute: mapped topic '/instruction' \(data.topics.instruction\) is not in the bag"
    ):
        ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path))


@pytest.mark.parametrize(
    "inside, text, reason",
    [
        (False, '{"instruction": "open the', r"^sidecar 'bad\.json': not valid JSON \(Unterminated string"),
        (False, '["open the drawer"]', r"^sidecar 'bad\.json': holds a list, expected an object"),
        (
            True,
            '{"instructions": "open the drawer"}',
            r"^sidecar 'bad/instruction\.json': has neither 'instruction' nor 'task' \(keys: \['instructions'\]\)$",
        ),
        (False, '{"instruction": 3}', r"^sidecar 'bad\.json': 'instruction' must be a non-empty string, got 3$"),
        (
            None,
            '{"instruction": "a"}',
            r"^two instruction sidecars, 'bad\.json' and 'bad/instruction\.json': keep one$",
        ),
    ],
)
def test_malformed_sidecar_is_quarantined_naming_it(tmp_path, inside, text, reason):
    raw = tmp_path / "raw"
    write_arm_bag(raw / "bad", n_frames=10, **SMALL)
    write_arm_bag(raw / "good", n_frames=10, **SMALL)
    for where in (
        [raw / "bad.json"]
        if inside is False
        else [raw / "bad" / "instruction.json"]
        if inside
        else [raw / "bad.json", raw / "bad" / "instruction.json"]
    ):
        where.write_text(text)
    report = ingest(raw, tmp_path / "episodes", ros_config(tmp_path, "data.on_bad_input=quarantine"))
    assert list(report["episodes"]) == ["good"] and report["summary"]["recordings"] == 2
    [entry] = report["quarantined"]
    assert (entry["recording"], entry["check"]) == ("bad", "bad_sidecar"), entry
    assert entry["stream"] == ("bad/instruction.json" if inside else "bad.json")
    assert re.search(reason, entry["reason"]), entry["reason"]


# ---- one long recording cut into episodes -----------------------------------------------------------
PARTS = [
    dict(n_frames=10, instruction="lift the blue block", seed=1),
    dict(n_frames=12, instruction="push the red block to the left", seed=2),
    dict(n_frames=4, instruction="open the drawer", seed=3),
    dict(n_frames=9, instruction="turn on the led", seed=4),
]


def test_long_recording_cut_by_instruction(tmp_path):
    """Each instruction message starts an episode: <bag>_000 ... in time order, each the same data as the
    episode recorded alone; the 4-frame one is quarantined as too short, the others kept."""
    write_long_bag(tmp_path / "raw" / "session", [{**p, **SMALL} for p in PARTS])
    cfg = ros_config(tmp_path, "data.on_bad_input=quarantine", "data.split.by=instruction")
    report = ingest(tmp_path / "raw", tmp_path / "episodes", cfg)
    assert list(report["episodes"]) == ["session_000", "session_001", "session_003"]
    assert [report["episodes"][k]["frames"] for k in report["episodes"]] == [10, 12, 9]
    [short] = report["quarantined"]
    assert (short["recording"], short["episode"], short["check"]) == ("session", "session_002", "too_short")
    assert short["reason"] == "4 synchronised frames, data.min_episode_len is 8"
    for i in (0, 1, 3):
        ep = read_episode(tmp_path / "episodes" / f"session_{i:03d}.h5")
        assert ep.instruction == PARTS[i]["instruction"] and ep.source == f"session episode 'session_{i:03d}'"
        _same_data(ep, _reference(tmp_path, f"part{i}", **{**PARTS[i], **SMALL}))
    again = ingest(tmp_path / "raw", tmp_path / "episodes2", cfg)  # stable ids and bytes
    assert again == report
    for i in (0, 1, 3):
        name = f"session_{i:03d}.h5"
        assert (tmp_path / "episodes" / name).read_bytes() == (tmp_path / "episodes2" / name).read_bytes()


@pytest.mark.slow  # the quick loop stays under 5 minutes; cut by instruction stays in it
def test_long_recording_cut_by_gaps(tmp_path):
    """No action for more than data.split.gap_s ends an episode; an episode without its own instruction
    message takes the one in force (the newest before it). Cut at a larger gap_s it is one episode, whose
    target jumps where one demonstration ends and the next begins: the plausibility check names it."""
    parts = [{**PARTS[0], **SMALL}, {**PARTS[1], **SMALL, "tweak": drop("instruction")}, {**PARTS[3], **SMALL}]
    write_long_bag(tmp_path / "raw" / "session", parts, pause_s=2.5, storage="mcap")
    report = ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, "data.split.by=gap"))
    got = {k: (v["frames"], v["instruction"]) for k, v in report["episodes"].items()}
    assert got == {
        "session_000": (10, PARTS[0]["instruction"]),
        "session_001": (12, PARTS[0]["instruction"]),
        "session_002": (9, PARTS[3]["instruction"]),
    }
    for i, part in zip((0, 1, 2), (PARTS[0], PARTS[1], PARTS[3])):
        _same_data(
            read_episode(tmp_path / "episodes" / f"session_{i:03d}.h5"),
            _reference(tmp_path, f"part{i}", **{**part, **SMALL}),
        )
    with pytest.raises(
        VlaopsError,
        match=r"session: key 'action/abs\[:, 0:3\]': the target position jumps [\d.]+ m/s "
        r"between frames 21 and 22",
    ):
        ingest(
            tmp_path / "raw",
            tmp_path / "episodes_uncut",
            ros_config(tmp_path, "data.split.by=gap", "data.split.gap_s=5.0"),
        )


def test_split_settings_are_checked(tmp_path):
    with pytest.raises(VlaopsError, match=r"data.split.by must be one of \('none', 'instruction', 'gap'\), got 'time'"):
        ros_config(tmp_path, "data.split.by=time")
    with pytest.raises(VlaopsError, match=r"data.split.gap_s must be > 0, got 0.0"):
        ros_config(tmp_path, "data.split.gap_s=0")


def test_cut_bag_is_read_about_twice_not_once_per_episode(tmp_path, monkeypatch):
    """The bag is indexed once (stamps and log times of every mapped message), then each episode reads its
    own log-time range: a long recording cut into many episodes costs about two passes, not one per episode."""
    from rosbags.highlevel import AnyReader

    parts = [dict(n_frames=9, instruction=f"task {i}", seed=i, **SMALL) for i in range(6)]
    bag = write_long_bag(tmp_path / "raw" / "session", parts)
    with AnyReader([bag]) as reader:
        total = reader.message_count
    calls = []
    original = AnyReader.deserialize
    monkeypatch.setattr(AnyReader, "deserialize", lambda self, raw, typ: calls.append(typ) or original(self, raw, typ))
    report = ingest(tmp_path / "raw", tmp_path / "episodes", ros_config(tmp_path, "data.split.by=instruction"))
    assert len(report["episodes"]) == 6
    assert total < len(calls) < 2.5 * total, (len(calls), total)
