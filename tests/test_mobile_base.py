"""A mobile base (the seed's robot car) as a second embodiment: Twist/TwistStamped bags -> ingest -> CALVIN
layout with 4-dim actions -> per-dimension normalisation with the class kept -> a policy whose head comes
from the data -> offline metrics with the action_type accuracy. Tiny data, tiny model, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bagfactory import BASE_LABELS, base_commands, set_action_type, set_twist, write_base_bag
from conftest import tiny_config

from vlaops.errors import RecordingError, VlaopsError
from vlaops.io import calvin
from vlaops.io.episode import read_episode

N = 18  # frames per bag, at 10 Hz
BASE = [
    "data.embodiment=mobile_base",
    f"data.base.action_types=[{','.join(BASE_LABELS)}]",
    "data.topics.rgb_static=/front_camera/image_raw",
    "data.topics.rgb_gripper=null",
    "data.control_hz=10",
    "model.use_hand_rgb=false",  # the rig has no gripper camera
]
TRAIN = [
    "train.max_steps=3",
    "train.batch_size=2",
    "train.log_every=1",
    "train.val_every=3",
    "train.val_batches=1",
    "train.save_every=0",
    "tracking.enabled=false",
    "eval.batch_size=2",
]


def base_cfg(tmp_path: Path, *overrides: str):
    return tiny_config(tmp_path, *BASE, *TRAIN, *overrides)


@pytest.fixture
def base_raw(tmp_path: Path) -> Path:
    """Four base bags: Twist and TwistStamped, String labels and Int32 class ids, sqlite3 and mcap."""
    raw = tmp_path / "raw"
    for i in range(4):
        write_base_bag(
            raw / f"base{i}",
            n_frames=N,
            stamped=i % 2 == 1,
            class_as_int=i >= 2,
            storage="mcap" if i == 3 else "sqlite3",
            instruction="drive to the red door" if i % 2 else "turn towards the charger",
        )
    return raw


@pytest.fixture
def base_data(tmp_path: Path, base_raw: Path):
    """base_raw ingested, converted and normalised by the stages' library functions; returns the config."""
    from vlaops.data.action_stats import normalize
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest

    cfg = base_cfg(tmp_path)
    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
    return cfg


# ---- ingest -------------------------------------------------------------------------------------------
def test_ingest_twist_and_twist_stamped(base_data):
    vel, classes = base_commands(N)
    for i in range(4):
        ep = read_episode(Path(base_data.data.episodes_dir) / f"base{i}.h5")
        assert ep.embodiment == "mobile_base" and len(ep) == N
        assert ep.action_base.shape == (N, 4)
        np.testing.assert_array_equal(ep.action_base[:, :3], vel)  # the Twist values, bit for bit
        np.testing.assert_array_equal(ep.action_base[:, 3], classes)  # labels and class ids alike
        assert json.loads(ep.extra_attrs["action_types"]) == BASE_LABELS
        # no arm state is made up for a base; no gripper camera on this rig
        assert ep.robot_obs is None and ep.action_abs is None and ep.rgb_gripper is None
        np.testing.assert_allclose(np.diff(ep.time), 0.1, atol=1e-6)
    # the action_type is published only when it changes: the stop class is held to the end
    assert set(np.unique(read_episode(Path(base_data.data.episodes_dir) / "base0.h5").action_base[-6:, 3])) == {2.0}


# ---- convert ------------------------------------------------------------------------------------------
def test_convert_writes_four_dim_actions(base_data):
    root = Path(base_data.data.calvin_dir)
    prov = json.loads((root / calvin.PROVENANCE).read_text())
    assert prov["embodiment"] == "mobile_base" and prov["action_types"] == BASE_LABELS
    assert prov["action_names"] == ["linear_x", "linear_y", "angular_z", "action_type"]
    assert calvin.dataset_info(root) == calvin.DatasetInfo("mobile_base", tuple(BASE_LABELS))
    vel, classes = base_commands(N)
    expected = np.concatenate([vel, classes[:, None].astype(float)], axis=1)  # (N, 4)
    for split in calvin.SPLITS:
        s = calvin.CalvinSplit(root / split)
        for start, end in s.ep_start_end_ids:
            assert end - start + 1 == N
            for k, frame in enumerate(range(int(start), int(end) + 1)):
                with np.load(s.frame_path(frame)) as npz:
                    assert sorted(npz.files) == sorted(calvin.BASE_FRAME_KEYS)  # no robot_obs / scene_obs
                    np.testing.assert_array_equal(npz["actions"], expected[k])
                    np.testing.assert_array_equal(npz["rel_actions"], expected[k])
                    assert npz["rgb_static"].shape == (200, 200, 3)
        stats = s.statistics()
        assert "robot_obs" not in stats
        np.testing.assert_allclose(stats["act_min_bound"], expected.min(0))
        np.testing.assert_allclose(stats["act_max_bound"], expected.max(0))


# ---- normalize ----------------------------------------------------------------------------------------
def test_normalize_bounds_each_dim_and_keeps_the_class(base_data):
    from vlaops.data.action_stats import split_rel_actions
    from vlaops.data.normalization import ActionNormalizer

    norm = ActionNormalizer.load(Path(base_data.data.normalized_dir))
    assert norm.action_classes == 3 and norm.class_labels == BASE_LABELS and norm.head_space() == (4, 3)
    vel, _ = base_commands(N)
    np.testing.assert_allclose(norm.act_min_bound, vel.min(0))
    np.testing.assert_allclose(norm.act_max_bound, vel.max(0))
    actions = split_rel_actions(calvin.CalvinSplit(Path(base_data.data.calvin_dir) / calvin.TRAINING))
    normalized = norm.normalize(actions)
    cont = normalized[:, :3]
    assert cont.min() >= -0.65 and cont.max() <= 0.65
    np.testing.assert_allclose(cont.min(0), -0.65)  # each dim's own bounds span the whole range
    np.testing.assert_allclose(cont.max(0), 0.65)
    np.testing.assert_array_equal(normalized[:, 3], actions[:, 3])  # a class id, never scaled
    np.testing.assert_allclose(norm.denormalize(normalized), actions, atol=1e-12)
    # the same normaliser on torch tensors (training and the runtime), and past the bounds: clipped
    beyond = torch.tensor([[9.0, -9.0, 0.0, 1.0]])
    out = norm.normalize(beyond)
    assert out[0, 0] == pytest.approx(0.65) and out[0, 1] == pytest.approx(-0.65) and out[0, 3] == 1.0
    assert json.loads((Path(base_data.data.normalized_dir) / "action_stats.json").read_text())["class_counts"] == [
        18.0,
        18.0,
        18.0,
    ]


def test_arm_normaliser_is_untouched():
    from vlaops.data.normalization import ActionNormalizer

    arm = ActionNormalizer(stats={"min": [0.0] * 7})
    x = np.array([[0.65, -1.0, 0.2, 0.0, 0.1, -0.3, -1.0]])
    np.testing.assert_allclose(arm.normalize(x), [[1.0, -1.0, 0.2 / 0.65, 0.0, 0.1 / 0.65, -0.3 / 0.65, 0.0]])
    assert arm.head_space() == (7, 0)


# ---- train + offline evaluation ----------------------------------------------------------------------
def test_train_head_from_data_and_offline_eval(base_data):
    from vlaops.data.dataset import make_window_dataset
    from vlaops.eval.offline import base_constant_action, offline_action_metrics
    from vlaops.model import PolicyRuntime
    from vlaops.stages import train

    cfg = base_data
    assert (cfg.model.action_dim, cfg.model.action_classes) == (7, 0)  # the config's defaults: the data decides
    train.run(cfg)
    model_dir = Path(cfg.paths.model_dir)
    saved = json.loads((model_dir / "policy_config.json").read_text())["model"]
    assert (saved["action_dim"], saved["action_classes"]) == (4, 3)
    runtime = PolicyRuntime.load(model_dir)  # rebuilds the same head from the export alone
    head = runtime.model.head
    c = cfg.model.fwd_pred_next_n
    assert head.arm[-1].out_features == c * 3 and head.action_class[-1].out_features == c * 3
    assert not hasattr(head, "gripper")
    # the runtime acts in the recording's units: velocities within the data's bounds, a class id
    runtime.reset()
    action = runtime.step({"rgb_static": np.zeros((48, 48, 3), np.uint8)}, "drive to the red door")
    assert action.shape == (4,) and action[3] in (0.0, 1.0, 2.0)
    assert np.all(action[:3] >= np.array(runtime.normalizer.act_min_bound) - 1e-9)
    assert np.all(action[:3] <= np.array(runtime.normalizer.act_max_bound) + 1e-9)

    val = calvin.CalvinSplit(Path(cfg.data.calvin_dir) / calvin.VALIDATION)
    ds = make_window_dataset(val, runtime.normalizer, runtime.processor, runtime.cfg, None, None)
    metrics = offline_action_metrics(
        runtime.model,
        ds,
        2,
        0,
        torch.device("cpu"),
        constant=base_constant_action(runtime.normalizer),
        normalizer=runtime.normalizer,
    )
    for key in (
        "continuous_mse",
        "continuous_mae",
        "linear_x_mae",
        "linear_y_mae",
        "angular_z_mae",
        "linear_x_mae_m_s",
        "angular_z_mae_rad_s",
        "loss",
        "baseline_continuous_mae",
    ):
        assert np.isfinite(metrics[key]) and metrics[key] >= 0, key
    assert 0.0 <= metrics["action_type_accuracy"] <= 1.0
    # every class equally frequent in training: the majority baseline is class 0 (drive), a third of the steps
    assert 0.0 < metrics["baseline_action_type_accuracy"] < 1.0
    assert metrics["windows"] == len(ds)
    # the evaluate stage: the offline half for a base (the embedded simulator is an arm), outputs that say so
    from vlaops.stages import evaluate

    evaluate.run(cfg)
    reports = Path(cfg.paths.reports_dir)
    written = json.loads((reports / "metrics.json").read_text())
    assert written["embodiment"] == "mobile_base" and written["closed_loop"].startswith("not run")
    assert written["offline"] == pytest.approx(metrics)
    assert json.loads((reports / "chains.json").read_text()) == []
    assert json.loads((reports / "videos" / "index.json").read_text()) == []
    assert all(
        (reports / "plots" / n).stat().st_size > 1000
        for n in ("sr_by_chain_length.png", "task_success.png", "action_trajectories.png")
    )


def test_offline_accuracy_counts_the_class(base_data):
    """A head that always says 'stop' is right exactly on the stop steps of the windows."""
    from vlaops.data import keys
    from vlaops.data.dataset import make_window_dataset
    from vlaops.data.normalization import ActionNormalizer
    from vlaops.eval.offline import offline_action_metrics
    from vlaops.model import VLAPolicy, make_processor

    cfg = base_data
    norm = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    import dataclasses

    mcfg = dataclasses.replace(cfg.model, action_dim=4, action_classes=3)
    val = calvin.CalvinSplit(Path(cfg.data.calvin_dir) / calvin.VALIDATION)
    proc = make_processor(mcfg, sorted({a.instruction for a in val.annotations}))
    policy = VLAPolicy.build(mcfg, len(proc.tokenizer))
    with torch.no_grad():
        last = policy.head.action_class[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 5.0]).repeat(mcfg.fwd_pred_next_n))
    ds = make_window_dataset(val, norm, proc, mcfg, None, None)
    masks = torch.stack([ds[i][keys.CHUNK_MASK] for i in range(len(ds))])
    classes = torch.stack([ds[i][keys.ACTION_CHUNK][..., -1] for i in range(len(ds))])
    expected = float(((classes == 2) & masks).sum() / masks.sum())
    metrics = offline_action_metrics(policy, ds, 4, 0, torch.device("cpu"))
    assert metrics["action_type_accuracy"] == pytest.approx(expected)
    assert 0 < expected < 1


# ---- bad input ----------------------------------------------------------------------------------------
def _read(path: Path, cfg):
    from vlaops.io.readers import read_bag

    return read_bag(path, path.name, cfg.data)


def test_nan_twist_is_refused(tmp_path):
    bag = write_base_bag(tmp_path / "nan", n_frames=N, tweak=set_twist(4, [0.1, float("nan"), 0.0]))
    with pytest.raises(RecordingError, match=r"message 4 has a non-finite velocity \(linear_y = nan\)") as exc:
        _read(bag, base_cfg(tmp_path))
    assert exc.value.check == "non_finite" and exc.value.stream == "/cmd_vel"


def test_unknown_action_type_label_is_refused(tmp_path):
    bag = write_base_bag(tmp_path / "odd", n_frames=N, tweak=set_action_type(N // 3, "reverse"))
    with pytest.raises(RecordingError, match=r"action_type 'reverse' is not one of data.base.action_types") as exc:
        _read(bag, base_cfg(tmp_path))
    assert exc.value.check == "unknown_action_type"
    bag = write_base_bag(tmp_path / "odd_id", n_frames=N, class_as_int=True, tweak=set_action_type(0, 7))
    with pytest.raises(RecordingError, match=r"class id 7 is outside \[0, 3\)"):
        _read(bag, base_cfg(tmp_path))


def test_base_bag_with_arm_settings_says_so(tmp_path):
    bag = write_base_bag(tmp_path / "car", n_frames=N)
    cfg = tiny_config(tmp_path, "data.control_hz=10")  # the arm's settings
    with pytest.raises(
        RecordingError,
        match=r"velocity commands on /cmd_vel \(geometry_msgs/msg/Twist\): a mobile base "
        r"recording\? set data.embodiment=mobile_base",
    ):
        _read(bag, cfg)


def test_mobile_base_needs_its_labels(tmp_path):
    with pytest.raises(VlaopsError, match="data.base.action_types"):
        tiny_config(tmp_path, "data.embodiment=mobile_base")
    with pytest.raises(VlaopsError, match="data.embodiment"):
        tiny_config(tmp_path, "data.embodiment=boat")
    with pytest.raises(VlaopsError, match="data.split.by='gap' is not supported for data.embodiment=mobile_base"):
        base_cfg(tmp_path, "data.split.by=gap")


def test_instruction_from_the_default_when_the_bag_has_none(tmp_path):
    from bagfactory import drop

    bag = write_base_bag(tmp_path / "quiet", n_frames=N, tweak=drop("instruction"))
    with pytest.raises(RecordingError, match=r"topic '/instruction' \(data.topics.instruction\) has no messages"):
        _read(bag, base_cfg(tmp_path))
    ep = _read(bag, base_cfg(tmp_path, "data.default_instruction='drive home'"))
    assert ep.instruction == "drive home" and ep.task == "drive_home"


def test_ingest_refuses_an_arm_episode_for_a_base(tmp_path):
    """A canonical arm episode in a base's raw directory: one dataset holds one embodiment."""
    from bagfactory import write_arm_bag

    from vlaops.data.ingest import ingest

    write_arm_bag(tmp_path / "arm_raw" / "arm0", n_frames=20)
    arm = tiny_config(tmp_path, "data.raw_dir=" + str(tmp_path / "arm_raw"))
    ingest(tmp_path / "arm_raw", tmp_path / "arm_eps", arm.data)
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "arm_eps" / "arm0.h5").rename(raw / "arm0.h5")
    cfg = base_cfg(tmp_path)
    with pytest.raises(
        RecordingError, match=r"an episode of embodiment 'arm', but data.embodiment is 'mobile_base'"
    ) as exc:
        ingest(raw, tmp_path / "episodes", cfg.data)
    assert exc.value.check == "wrong_embodiment"


@pytest.mark.slow
def test_a_base_policy_learns_its_class_and_velocities(tmp_path):
    """Every link from the Twist bag to the trained head: overfit on identical base episodes, the class head
    beats the most-frequent-class baseline by far and the velocity head the mean-action baseline (a class id
    scaled, a dim misaligned or a mask wrong would leave it at the baseline). Measured at 300 steps, batch 8
    on 2 loaded cores: accuracy 0.85 against 0.30, continuous MAE 0.25 against 0.35."""
    from vlaops.data.action_stats import normalize
    from vlaops.data.convert import convert
    from vlaops.data.dataset import make_window_dataset
    from vlaops.data.ingest import ingest
    from vlaops.eval.offline import base_constant_action, offline_action_metrics
    from vlaops.model import PolicyRuntime
    from vlaops.stages import train

    for i in range(4):
        write_base_bag(tmp_path / "raw" / f"b{i}", n_frames=30, stamped=i % 2 == 1)
    cfg = base_cfg(
        tmp_path,
        "train.max_steps=300",
        "train.batch_size=8",
        "train.log_every=50",
        "train.val_every=300",
        "data.augment.rgb_pad=0",
        "data.augment.brightness=0",
        "data.augment.contrast=0",
        "data.augment.saturation=0",
        "model.arm_gripper_loss_ratio=1.0",
    )
    ingest(Path(cfg.data.raw_dir), Path(cfg.data.episodes_dir), cfg.data)
    convert(Path(cfg.data.episodes_dir), Path(cfg.data.calvin_dir), cfg.data)
    normalize(Path(cfg.data.calvin_dir), Path(cfg.data.normalized_dir), cfg.data)
    train.run(cfg)
    rt = PolicyRuntime.load(Path(cfg.paths.model_dir))
    ds = make_window_dataset(
        calvin.CalvinSplit(Path(cfg.data.calvin_dir) / calvin.TRAINING), rt.normalizer, rt.processor, rt.cfg, None, None
    )
    m = offline_action_metrics(rt.model, ds, 8, 0, torch.device("cpu"), constant=base_constant_action(rt.normalizer))
    assert m["action_type_accuracy"] > m["baseline_action_type_accuracy"] + 0.3, m
    assert m["continuous_mae"] < 0.9 * m["baseline_continuous_mae"], m
