"""vlaops inspect: the summary of raw recordings, episodes and CALVIN splits equals what was written; a bad
recording is listed with its reason; the contact sheet shows the right frames; bad input is one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from bagfactory import resize_camera, write_arm_bag
from conftest import CONF
from h5factory import ALOHA_POSE_OVERRIDES, write_aloha, write_robomimic
from PIL import Image

from vlaops.cli import main
from vlaops.data.config import DataConfig
from vlaops.data.contact_sheet import cell_box, sheet_size
from vlaops.data.inspect import ARM_DIMS, inspect_path, summary_table
from vlaops.errors import VlaopsError
from vlaops.io import calvin
from vlaops.io.episode import Episode, read_episode, write_episode

LIFT, PUSH = "lift the blue block", "push the red block to the left"


def _cell_colour(sheet: np.ndarray, row: int, column: int, upper: bool) -> np.ndarray:
    """The mean colour of the middle of the upper (or lower) half of one cell: the bag factory's frame k
    is (255 - k, k, k) above and (k, k, k) below."""
    left, top, right, bottom = cell_box(row, column)
    y = top + (bottom - top) // 4 if upper else bottom - (bottom - top) // 4
    x = (left + right) // 2
    return sheet[y - 4 : y + 4, x - 4 : x + 4].reshape(-1, 3).mean(0)


def test_raw_directory_summary_equals_the_recordings(cfg, raw_dir, tmp_path):
    write_arm_bag(raw_dir / "bad", n_frames=20, tweak=resize_camera(5, 32))  # the static camera changes size
    (raw_dir / "notes.txt").write_text("not a recording")
    sheet = tmp_path / "reports" / "inspect.png"
    summary = inspect_path(raw_dir, cfg.data, sheet=sheet, sheet_episodes=3)

    assert summary["kind"] == "raw" and summary["episodes"] == 4 and summary["frames"] == 80
    assert summary["tasks"] == {"lift_the_blue_block": 2, "push_the_red_block_to_the_left": 2}
    assert summary["instructions"] == {LIFT: 2, PUSH: 2}
    assert summary["cameras"] == {"rgb_static": {"64x64": 4}, "rgb_gripper": {"32x32": 4}}
    assert summary["control_hz"] == {"30": 4} and summary["embodiments"] == {"arm": 4}
    # what the bag factory commands: x 0.4, y from -0.01 down to -0.20 (1 cm a frame), z 0.3, roll pi,
    # gripper open for the first half and closed after
    act = summary["actions"]["action/abs"]
    assert act["dims"] == list(ARM_DIMS) and set(summary["actions"]) == {"action/abs"}
    np.testing.assert_allclose(act["min"], [0.4, -0.20, 0.3, np.pi, 0.0, 0.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(act["max"], [0.4, -0.01, 0.3, np.pi, 0.0, 0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(act["mean"][1], -0.105, atol=1e-9)
    np.testing.assert_allclose(act["mean"][6], 0.0, atol=1e-9)

    # both bad entries listed with ingest's reasons, in recording order
    assert [(u["recording"], u["check"]) for u in summary["unreadable"]] == [
        ("bad", "frame_size"),
        ("notes.txt", "unknown_format"),
    ]
    assert "frame size changes mid-episode, from (64, 64, 3) to (32, 32, 3)" in summary["unreadable"][0]["reason"]
    assert "not a recording vlaops can read" in summary["unreadable"][1]["reason"]
    table = summary_table(summary)
    assert "bad [frame_size]: topic '/camera/static/image_raw': frame size changes" in table
    assert re.search(r"\n  y +-0\.2 +-0\.01 +-0\.105 ", table)

    # the sheet: 3 episodes spread over bad, ep0..ep3; 'bad' cannot be read, its neighbour ep0 takes its place
    assert summary["sheet"]["episodes"] == [f"ep0: {LIFT}", f"ep1: {PUSH}", f"ep3: {PUSH}"]
    image = Image.open(sheet)
    image.load()
    assert image.format == "PNG" and image.size == sheet_size(3, 2) == tuple(summary["sheet"]["size"])
    pixels = np.asarray(image.convert("RGB")).astype(float)
    assert pixels.std() > 30  # not blank
    # row 0 is ep0: static first (k=0), middle (k=10), last (k=19); gripper frame k holds 3k
    for column, k in enumerate([0, 10, 19, 0, 30, 57]):
        np.testing.assert_allclose(_cell_colour(pixels, 0, column, upper=True), [255 - k, k, k], atol=0.5)
        np.testing.assert_allclose(_cell_colour(pixels, 0, column, upper=False), [k, k, k], atol=0.5)
    assert not list(sheet.parent.glob(".*tmp*"))  # written atomically: no temporary left


@pytest.fixture
def converted(cfg, raw_dir) -> Path:
    """conftest's raw_dir ingested and converted (its calvin_dir also normalises, which imports torch:
    most of its time, and nothing inspect reads)."""
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest

    ingest(raw_dir, Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    return Path(cfg.data.calvin_dir)


def test_episodes_and_calvin_summaries_equal_the_files(cfg, converted, tmp_path):
    calvin_dir = converted
    episodes_dir = Path(cfg.data.episodes_dir)
    summary = inspect_path(episodes_dir, cfg.data)
    written = [read_episode(p) for p in sorted(episodes_dir.glob("*.h5"))]
    assert summary["kind"] == "episodes" and summary["episodes"] == 4 == len(written)
    assert summary["frames"] == sum(len(e) for e in written) and summary["sheet"] is None
    actions = np.concatenate([e.action_abs for e in written])
    for key, reduce in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
        np.testing.assert_allclose(summary["actions"]["action/abs"][key], reduce(actions, axis=0), atol=1e-12)

    sheet = tmp_path / "calvin.png"
    summary = inspect_path(calvin_dir, cfg.data, sheet=sheet, sheet_episodes=2)
    frames = [dict(np.load(p)) for split in calvin.SPLITS for p in sorted((calvin_dir / split).glob("episode_*.npz"))]
    assert summary["kind"] == "calvin" and summary["episodes"] == 4 and summary["frames"] == len(frames) == 80
    assert summary["splits"] == {
        "training": {"episodes": 3, "frames": 60, "annotations": 3},
        "validation": {"episodes": 1, "frames": 20, "annotations": 1},
    }
    assert summary["instructions"] == {LIFT: 2, PUSH: 2} and summary["control_hz"] == {}
    assert summary["cameras"] == {"rgb_static": {"200x200": 4}, "rgb_gripper": {"84x84": 4}}
    for key in ("actions", "rel_actions"):
        values = np.stack([f[key] for f in frames])
        np.testing.assert_allclose(summary["actions"][key]["min"], values.min(0), atol=1e-12)
        np.testing.assert_allclose(summary["actions"][key]["max"], values.max(0), atol=1e-12)
    # rows named by convert's episode ids and split; the first and the last annotation of the dataset
    provenance = json.loads((calvin_dir / calvin.PROVENANCE).read_text())["episodes"]
    first = next(i for i, e in provenance.items() if e["split"] == "training" and e["start"] == 0)
    last = next(i for i, e in provenance.items() if e["split"] == "validation")
    assert [row.split(":")[0] for row in summary["sheet"]["episodes"]] == [
        f"{first} (training)",
        f"{last} (validation)",
    ]
    assert Image.open(sheet).size == sheet_size(2, 2)

    split = inspect_path(calvin_dir / "validation", cfg.data)
    assert split["kind"] == "calvin_split" and split["episodes"] == 1 and split["frames"] == 20

    # an episode recorded without a gripper camera (convert fills its frames with zeros) has no gripper size
    stamp = json.loads((calvin_dir / calvin.PROVENANCE).read_text())
    stamp["episodes"][last]["has_gripper_camera"] = False
    (calvin_dir / calvin.PROVENANCE).write_text(json.dumps(stamp))
    split = inspect_path(calvin_dir / "validation", cfg.data, sheet=sheet, sheet_episodes=1)
    assert split["cameras"] == {"rgb_static": {"200x200": 1}} and split["sheet"]["cameras"] == ["rgb_static"]

    # a missing frame file: its episode is listed with the file and the reason, the others are summarised
    (calvin_dir / "training" / calvin.FRAME_FILE.format(5)).unlink()
    split = inspect_path(calvin_dir / "training", cfg.data)
    assert split["episodes"] == 2 and split["frames"] == 40
    assert split["unreadable"] == [
        {
            "recording": "training/episode_0000005.npz",
            "episode": first,
            "check": "unreadable",
            "stream": None,
            "reason": "frame file missing",
        }
    ]


def test_mobile_base_episodes_name_their_velocity_dims(tmp_path):
    """Canonical episodes of a base (no ingest report beside them: told by content), 4-dim actions."""
    out, t = tmp_path / "episodes", 12
    for i in range(2):
        base = np.stack(
            [np.linspace(0.0, 0.5, t) + i, np.zeros(t), np.linspace(-0.3, 0.3, t), np.arange(t) % 3], axis=1
        )
        write_episode(
            out / f"car{i}.h5",
            Episode(
                episode_id=f"car{i}",
                source="car.db3",
                source_sha256="0" * 64,
                source_format="rosbag2",
                embodiment="mobile_base",
                instruction="drive to the door",
                task="drive_to_the_door",
                control_hz=10.0,
                time=np.arange(t) / 10.0,
                rgb_static=np.full((t, 24, 32, 3), 90 * i, np.uint8),
                action_base=base,
                extra_attrs={"action_types": json.dumps(["drive", "turn", "stop"])},
            ),
        )
    sheet = tmp_path / "car.png"
    summary = inspect_path(out, DataConfig(num_workers=1), sheet=sheet, sheet_episodes=4)
    assert summary["kind"] == "episodes" and summary["embodiments"] == {"mobile_base": 2}
    assert summary["frames"] == 24 and summary["control_hz"] == {"10": 2}
    stats = summary["actions"]["action/base"]
    assert stats["dims"] == ["linear_x", "linear_y", "angular_z", "action_type"] and set(summary["actions"]) == {
        "action/base"
    }
    np.testing.assert_allclose(stats["min"], [0.0, 0.0, -0.3, 0.0])
    np.testing.assert_allclose(stats["max"], [1.5, 0.0, 0.3, 2.0])
    assert summary["cameras"] == {"rgb_static": {"24x32": 2}} and summary["sheet"]["cameras"] == ["rgb_static"]
    assert Image.open(sheet).size == sheet_size(2, 1)


def run_cli(*args: str) -> int:
    return main(["inspect", *args, "--config-dir", str(CONF), "data.num_workers=1"])


def test_cli_reads_hdf5_with_a_key_map_and_writes_json(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_robomimic(raw / "lift.hdf5", n_demos=3, broken={1: "nan_action"})
    write_aloha(raw / "towel.hdf5", n_frames=20)
    out = tmp_path / "inspect.json"
    rc = run_cli(
        str(raw),
        "--json",
        str(out),
        "--sheet",
        str(tmp_path / "sheet.png"),
        "--episodes",
        "2",
        "data.control_hz=20",
        "data.hdf5.robomimic.instruction='lift the cube'",
        *ALOHA_POSE_OVERRIDES,
    )
    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["episodes"] == 3 and summary["frames"] == 60 and summary["control_hz"] == {"20": 3}
    assert [(u["recording"], u["episode"]) for u in summary["unreadable"]] == [("lift.hdf5", "demo_1")]
    assert summary["instructions"] == {"lift the cube": 2, "fold the towel": 1}
    assert summary["cameras"]["rgb_gripper"] == {"16x16": 2, "32x32": 1}  # robomimic's eye-in-hand is half size
    assert len(summary["sheet"]["episodes"]) == 2
    printed = capsys.readouterr().out
    assert f"{raw}: raw recordings" in printed and "lift.hdf5 episode 'demo_1'" in printed


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: [], "expected one PATH (a directory of recordings, episodes or a CALVIN split), got none"),
        (lambda tmp: [str(tmp / "missing")], "missing: not found; expected a raw recordings directory"),
        (lambda tmp: [str((tmp / "empty").mkdir() or tmp / "empty")], "empty: empty directory; expected recordings"),
        (
            lambda tmp: [str((tmp / "notes.txt").write_text("x") and tmp / "notes.txt")],
            "notes.txt: not a recording vlaops can read",
        ),
    ],
)
def test_cli_bad_path_is_one_line(tmp_path, capsys, make, expected):
    assert run_cli(*make(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlaops inspect: error: ") and expected in err[0]


def test_cli_nothing_readable_prints_the_reasons_then_fails(tmp_path, capsys):
    write_arm_bag(tmp_path / "raw" / "nocam", omit=("static",))
    assert run_cli(str(tmp_path / "raw")) == 1
    captured = capsys.readouterr()
    assert (
        "nocam [" in captured.out
        and "'/camera/static/image_raw' (data.topics.rgb_static) is not in the bag" in captured.out
    )
    assert captured.err.strip().splitlines()[-1] == (
        f"vlaops inspect: error: {tmp_path / 'raw'}: no episode could be read (1 unreadable, listed above)"
    )


def test_sheet_needs_an_episode(tmp_path):
    with pytest.raises(VlaopsError, match="episodes on the contact sheet: expected at least 1, got 0"):
        inspect_path(tmp_path, DataConfig(), sheet=tmp_path / "s.png", sheet_episodes=0)


def test_help_describes_inspect(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help", "--config-dir", str(CONF)])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "inspect PATH (not a stage)" in help_text and "'vlaops inspect PATH [key=value ...]' summarises" in help_text
    assert "--sheet PNG" in help_text and "--episodes N" in help_text and "--json FILE" in help_text
