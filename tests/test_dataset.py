"""The training loader yields the RoboVLMs batch contract."""

from __future__ import annotations

from pathlib import Path

import torch

from vlaops.data import keys
from torch.utils.data import default_collate

from vlaops.data.dataset import CalvinWindowDataset
from vlaops.data.normalization import ActionNormalizer
from vlaops.io.calvin import CalvinSplit


def _tokenize(texts):
    ids = torch.tensor([[len(t), 1, 2, 0] for t in texts])
    return ids, (ids > 0).long()


def test_windows_follow_the_batch_contract(calvin_dir, cfg):
    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    ds = CalvinWindowDataset(split, normalizer, _tokenize, window_size=3, chunk_size=4, image_size=64, augment=cfg.data.augment)
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
