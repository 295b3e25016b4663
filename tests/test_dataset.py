"""The training loader yields the RoboVLMs batch contract."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import default_collate

from vlaops.data import keys
from vlaops.data.dataset import CalvinWindowDataset
from vlaops.data.normalization import ActionNormalizer
from vlaops.io.calvin import CalvinSplit


def _tokenize(texts):
    ids = torch.tensor([[len(t), 1, 2, 0] for t in texts])
    return ids, (ids > 0).long()


def test_windows_follow_the_batch_contract(calvin_dir, cfg):
    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    ds = CalvinWindowDataset(
        split, normalizer, _tokenize, window_size=3, chunk_size=4, image_size=64, augment=cfg.data.augment
    )
    assert len(ds) == 3 * (20 - 3 + 1)
    batch = default_collate([ds[0], ds[len(ds) - 1]])
    assert batch[keys.RGB].shape == (2, 3, 3, 64, 64) and batch[keys.HAND_RGB].shape == (2, 3, 3, 64, 64)
    assert batch[keys.ACTION].shape == (2, 3, 7) and batch[keys.ACTION_CHUNK].shape == (2, 3, 4, 7)
    assert batch[keys.CHUNK_MASK].dtype == torch.bool and batch[keys.TEXT].shape == (2, 4)
    assert len(batch[keys.RAW_TEXT]) == 2 and batch[keys.DATA_SOURCE] == ["calvin_action"] * 2
    # the first window of a span is all inside it; the last one runs past the end of its span
    assert batch[keys.CHUNK_MASK][0].all()
    assert batch[keys.CHUNK_MASK][1, -1].tolist() == [True, False, False, False]
    # chunk step 0 of window frame i is the action of that frame
    torch.testing.assert_close(batch[keys.ACTION_CHUNK][:, :, 0], batch[keys.ACTION])
    arm = batch[keys.ACTION][..., :6]
    assert arm.abs().max() <= 1.0 and set(batch[keys.ACTION][..., 6].unique().tolist()) <= {0.0, 1.0}


def test_padded_windows_end_at_each_span_start_and_carry_no_loss_before_it(calvin_dir, cfg):
    """``pad_history``: W - 1 more windows per span, the first frame repeated before the span's start (as
    ``PolicyRuntime`` fills its history at an episode's first step), with the padded positions masked."""
    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    args = (split, normalizer, _tokenize)
    kw = dict(window_size=3, chunk_size=4, image_size=64, augment=None)
    plain = CalvinWindowDataset(*args, **kw)
    padded = CalvinWindowDataset(*args, **kw, pad_history=True)
    assert len(padded) == len(plain) + 3 * 2
    first = padded[0]  # ends at the first frame of the first span: [f0, f0, f0]
    assert all(torch.equal(first[k][i], first[k][2]) for k in (keys.RGB, keys.HAND_RGB) for i in (0, 1))
    assert first[keys.CHUNK_MASK].tolist() == [[False] * 4, [False] * 4, [True] * 4]
    second = padded[1]  # [f0, f0, f1]
    assert second[keys.CHUNK_MASK][:, 0].tolist() == [False, True, True]
    aligned = plain[0]  # [f0, f1, f2]: the same frames and targets where they overlap
    torch.testing.assert_close(first[keys.ACTION_CHUNK][2], aligned[keys.ACTION_CHUNK][0])
    torch.testing.assert_close(second[keys.RGB][1:], aligned[keys.RGB][:2])
    torch.testing.assert_close(second[keys.ACTION_CHUNK][1:], aligned[keys.ACTION_CHUNK][:2])
    assert padded[2][keys.CHUNK_MASK].all()  # the first unpadded window is the plain one
    torch.testing.assert_close(padded[2][keys.RGB], aligned[keys.RGB])


def test_aux_targets_are_the_window_frames_robot_state_standardised_by_the_training_statistics(calvin_dir, cfg):
    """``aux_dims`` (model.aux_robot_dims): each window frame's robot_obs dims, standardised by the split's
    statistics.yaml (the training split's mean/std in both splits); padded positions repeat the first frame.
    Nothing of the scene (scene_obs) is ever a target: a robot records none."""
    import numpy as np
    import pytest

    from vlaops.errors import VlaopsError

    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    stats = split.statistics()
    std = stats["robot_obs"][0]["std"]
    robot = [d for d, v in enumerate(std) if v > 1e-6][:3]  # the test bags hold some fixed
    flat = [d for d, v in enumerate(std) if v <= 1e-6]
    assert robot and flat
    ds = CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, 64, None, pad_history=True, aux_dims=robot)
    mean, sd = np.asarray(stats["robot_obs"][0]["mean"])[robot], np.asarray(std)[robot]
    ann = ds.annotations[0]
    raw = np.stack([split.load_frame(ann.start + i, ("robot_obs",))["robot_obs"][robot] for i in range(3)])  # (3, K)
    first, aligned = ds[0], ds[2]  # [f0, f0, f0] and [f0, f1, f2]
    torch.testing.assert_close(aligned[keys.AUX_TARGET], torch.from_numpy(((raw - mean) / sd).astype(np.float32)))
    torch.testing.assert_close(first[keys.AUX_TARGET], aligned[keys.AUX_TARGET][:1].expand(3, -1))
    assert keys.AUX_TARGET not in CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, 64, None)[0]
    # a dim the recordings never move (std 0) cannot train the read-out: say so, name the file
    with pytest.raises(VlaopsError, match=rf"statistics.yaml: robot_obs dims \[{flat[0]}\] never vary.*aux_robot_dims"):
        CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, 64, None, aux_dims=[flat[0], robot[0]])


def test_aux_goal_appends_where_the_span_ends_from_the_robots_own_state(calvin_dir, cfg):
    """``aux_goal``: each frame's target is its robot_obs dims, then the dims of the annotated span's last
    frame (where the TCP ends the subtask), both standardised; every window of a span shares that goal.
    It is read from the recording's robot_obs alone: no scene state."""
    import dataclasses

    import numpy as np
    import pytest

    from vlaops.model.policy import VLAPolicy

    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    stats = split.statistics()
    std = stats["robot_obs"][0]["std"]
    robot = [d for d, v in enumerate(std) if v > 1e-6][:3]
    plain = CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, 64, None, aux_dims=robot)
    goal = CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, 64, None, aux_dims=robot, aux_goal=True)
    k = len(robot)
    ann = goal.annotations[0]
    last = split.load_frame(ann.end, ("robot_obs",))["robot_obs"][robot]
    mean, sd = np.asarray(stats["robot_obs"][0]["mean"])[robot], np.asarray(std)[robot]
    expected = torch.from_numpy(((last - mean) / sd).astype(np.float32))
    spans = [i for i, (span, _) in enumerate(goal.index) if span == 0]
    assert len(spans) > 1
    for i in (spans[0], spans[-1]):
        target = goal[i][keys.AUX_TARGET]  # (W, 2K)
        assert target.shape == (3, 2 * k)
        torch.testing.assert_close(target[:, :k], plain[i][keys.AUX_TARGET])
        torch.testing.assert_close(target[:, k:], expected.expand(3, -1))
    # the read-outs are built that wide, and train on it
    model_cfg = dataclasses.replace(cfg.model, aux_weight=0.3, aux_robot_dims=robot, aux_goal=True, pretrained_dir=None)
    assert model_cfg.aux_target_dim == 2 * k
    policy = VLAPolicy.build(model_cfg, vocab_size=cfg.model.vocab_size)
    assert all(head.out_features == 2 * k for head in policy.aux_heads.values())
    with pytest.raises(ValueError, match="aux_goal needs the read-outs on"):
        dataclasses.replace(cfg.model, aux_weight=0.0, aux_goal=True)


def test_aux_dims_from_data_keeps_the_dims_that_vary_and_turns_the_read_outs_off_without_any(calvin_dir, cfg, caplog):
    """As train sets the head's action space from the data: constant dims (a TCP that never moves along an
    axis) are left out with a warning; none left turns the read-outs off."""
    import dataclasses

    from vlaops.data.dataset import aux_dims_from_data

    split = CalvinSplit(calvin_dir / "training")
    std = split.statistics()["robot_obs"][0]["std"]
    model = dataclasses.replace(cfg.model, aux_weight=0.3, aux_robot_dims=[0, 1, 2])
    cut = aux_dims_from_data(model, split)
    assert cut.aux_robot_dims == [d for d in (0, 1, 2) if std[d] > 1e-6] != [0, 1, 2]
    assert cut.aux_weight == 0.3
    assert "never vary" in caplog.text and "aux_robot_dims" in caplog.text
    assert aux_dims_from_data(cut, split) == cut  # what train cut, the datasets keep
    flat = [d for d, v in enumerate(std) if v <= 1e-6]
    off = aux_dims_from_data(dataclasses.replace(model, aux_robot_dims=flat), split)
    assert off.aux_weight == 0.0 and "the read-outs are off" in caplog.text
