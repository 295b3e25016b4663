"""The packed frame cache: same bits as the npz path and the runtime, built once, rebuilt when the split
changes, and never taken as whole after an interrupted build."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vlaops.data import keys
from vlaops.data.dataset import CalvinWindowDataset, make_window_dataset
from vlaops.data.frame_cache import FRAME_IDS_FILE, META_FILE, annotated_frame_ids, open_frame_cache
from vlaops.data.normalization import ActionNormalizer
from vlaops.data.sampling import SampleKey
from vlaops.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    augment_to_model_input,
    normalize_uint8,
    resize_uint8,
    to_model_input,
)
from vlaops.errors import VlaopsError
from vlaops.io.calvin import CalvinSplit, write_split_metadata

S = 64  # conftest's model.image_size


def _tokenize(texts):
    ids = torch.tensor([[len(t), 1, 2, 0] for t in texts])
    return ids, (ids > 0).long()


def _datasets(calvin_dir: Path, cfg, augment=None, pad_history=False):
    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    frames = open_frame_cache(split, S, cfg.data.cache_dir)
    cached = CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, S, augment, frames, pad_history)
    plain = CalvinWindowDataset(split, normalizer, _tokenize, 3, 4, S, augment, None, pad_history)
    return cached, plain


def _cache_dirs(cache_dir: str) -> list[Path]:
    """The caches a run could take: visible directories (a build in progress is a hidden temporary)."""
    return sorted(p for p in Path(cache_dir).iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize("pad_history", [False, True])
def test_cached_samples_equal_the_npz_path_bit_for_bit(calvin_dir, cfg, pad_history):
    cached, plain = _datasets(calvin_dir, cfg, pad_history=pad_history)
    assert len(cached) == len(plain) > 0
    for i in [*range(0, len(plain), 5), len(plain) - 1]:  # every span, first and last windows included
        a, b = cached[i], plain[i]
        assert torch.equal(a[keys.RGB], b[keys.RGB]) and torch.equal(a[keys.HAND_RGB], b[keys.HAND_RGB])
        assert a[keys.RGB].shape == (3, 3, S, S) and a[keys.RGB].dtype == torch.float32
        assert torch.equal(a[keys.ACTION_CHUNK], b[keys.ACTION_CHUNK]) and torch.equal(
            a[keys.CHUNK_MASK], b[keys.CHUNK_MASK]
        )


def test_augmentation_stays_per_sample_on_cached_frames(calvin_dir, cfg):
    """The augmentation of a sample is a function of its key (seed, epoch, index) alone: the same key gives
    the same bits from the cache and from the npz files, whatever the global generator did; another epoch
    or seed draws anew."""
    cached, plain = _datasets(calvin_dir, cfg, augment=cfg.data.augment)
    key = SampleKey(5, epoch=2, seed=7)
    torch.manual_seed(3)
    first = cached[key][keys.RGB]
    torch.manual_seed(4)
    assert torch.equal(first, plain[key][keys.RGB])  # same key, same input bits: same output
    assert not torch.equal(cached[key._replace(epoch=3)][keys.RGB], first)  # a new draw per epoch ...
    assert not torch.equal(cached[key._replace(seed=8)][keys.RGB], first)  # ... and per seed


def test_cached_frame_is_what_the_runtime_feeds_the_model(calvin_dir, cfg):
    """PolicyRuntime.images (the runtime, per step) on a raw frame gives the cached sample's frame exactly."""
    from vlaops.model import PolicyRuntime, VLAPolicy, make_processor

    cached, _ = _datasets(calvin_dir, cfg)
    split = cached.split
    processor = make_processor(cfg.model, sorted({a.instruction for a in split.annotations}))
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    policy = PolicyRuntime(VLAPolicy.build(cfg.model, len(processor.tokenizer)), processor, normalizer, "cpu")
    k, t = cached.index[7]
    sample = cached[7]
    for i in range(3):
        obs = split.load_frame(cached.annotations[k].start + t + i, ("rgb_static", "rgb_gripper"))
        rgb, hand = policy.images(obs)  # (1, 3, S, S) each
        assert torch.equal(rgb[0], sample[keys.RGB][i]) and torch.equal(hand[0], sample[keys.HAND_RGB][i])


def test_resize_does_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (5, 200, 200, 3), dtype=np.uint8))
    together = resize_uint8(frames, 224)
    alone = torch.cat([resize_uint8(frames[i : i + 1], 224) for i in range(5)])
    assert together.dtype == torch.uint8 and together.shape == (5, 3, 224, 224) and together.is_contiguous()
    assert torch.equal(together, alone)
    assert torch.equal(to_model_input(frames, 224), normalize_uint8(together))
    assert torch.equal(resize_uint8(frames, 200), frames.permute(0, 3, 1, 2))  # already at size: planes only
    # CLIP normalisation as CLIPImageProcessor defines it: (v / 255 - mean) / std
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_uint8(together), (together.float() / 255 - mean) / std, rtol=0, atol=1e-6)


def _step_by_step_augment(images: torch.Tensor, pad: int, strength: float, g: torch.Generator) -> torch.Tensor:
    """The reference: RoboVLMs' random shift, then colour jitter, on CLIP-normalised uint8 planes (N, 3, S, S),
    one operation at a time (as the loader did before the fused version)."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (images.float() / 255.0 - mean) / std
    _, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
        x = padded[:, :, dy : dy + h, dx : dx + w]
    x = x * std + mean
    b, c, s = (1.0 + (torch.rand((), generator=g).item() * 2 - 1) * strength for _ in range(3))
    x = x * b
    gray = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - gray) * c + gray
    luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = (x - luma) * s + luma
    return (x.clamp(0.0, 1.0) - mean) / std


@pytest.mark.parametrize("pad, strength", [(10, 0.1), (4, 0.5), (0, 0.3)])
def test_fused_augmentation_is_the_step_by_step_one(pad, strength):
    frames = torch.from_numpy(np.random.default_rng(pad).integers(0, 256, (4, 3, 48, 48), dtype=np.uint8))
    for seed in range(5):
        fused = augment_to_model_input(frames, pad, strength, strength, strength, torch.Generator().manual_seed(seed))
        reference = _step_by_step_augment(frames, pad, strength, torch.Generator().manual_seed(seed))
        assert fused.shape == (4, 3, 48, 48)
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    # no jitter: shift and normalisation only; no augmentation at all: normalisation only
    shifted = augment_to_model_input(frames, pad, 0.0, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(augment_to_model_input(frames, 0, 0.0, 0.0, 0.0), normalize_uint8(frames))
    if pad == 0:
        assert torch.equal(shifted, normalize_uint8(frames))


def test_built_once_then_reused(calvin_dir, cfg):
    split = CalvinSplit(calvin_dir / "training")
    first = open_frame_cache(split, S, cfg.data.cache_dir)
    stamp = [(p.name, p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(first.dir.iterdir())]
    second = open_frame_cache(CalvinSplit(calvin_dir / "training"), S, cfg.data.cache_dir)
    assert first.built and not second.built
    assert second.dir == first.dir
    assert [(p.name, p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(second.dir.iterdir())] == stamp
    assert len(second) == len(annotated_frame_ids(split)) == sum(a.end - a.start + 1 for a in split.annotations)
    # another size and another split are caches of their own, beside it
    other = open_frame_cache(split, 32, cfg.data.cache_dir)
    val = open_frame_cache(CalvinSplit(calvin_dir / "validation"), S, cfg.data.cache_dir)
    assert other.built and val.built and len(_cache_dirs(cfg.data.cache_dir)) == 3


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_cache_gets_the_umask_permissions(calvin_dir, cfg, mask):
    """A cache on shared storage is readable by the group as any file the user makes (not mkdtemp's 0700)."""
    import stat

    old = os.umask(mask)
    try:
        cache = open_frame_cache(CalvinSplit(calvin_dir / "training"), S, cfg.data.cache_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.dir.stat().st_mode) == 0o777 & ~mask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask for p in cache.dir.iterdir())


def test_the_factory_reuses_the_cache_or_reads_npz_without_one(calvin_dir, cfg):
    from vlaops.model import make_processor

    split = CalvinSplit(calvin_dir / "training")
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    processor = make_processor(cfg.model, sorted({a.instruction for a in split.annotations}))
    a = make_window_dataset(split, normalizer, processor, cfg.model, None, cfg.data.cache_dir)
    b = make_window_dataset(split, normalizer, processor, cfg.model, None, cfg.data.cache_dir)
    plain = make_window_dataset(split, normalizer, processor, cfg.model, None, None)
    assert a.frames.built and not b.frames.built and plain.frames is None
    assert (a.window_size, a.chunk_size, a.image_size) == (
        cfg.model.window_size,
        cfg.model.fwd_pred_next_n,
        cfg.model.image_size,
    )
    assert torch.equal(a[0][keys.RGB], plain[0][keys.RGB]) and torch.equal(a[0][keys.TEXT], plain[0][keys.TEXT])


def test_rewritten_frame_rebuilds(calvin_dir, cfg):
    split = CalvinSplit(calvin_dir / "training")
    old = open_frame_cache(split, S, cfg.data.cache_dir)
    frame_id = int(old.frame_ids[4])
    path = split.frame_path(frame_id)
    with np.load(path) as npz:
        content = {k: npz[k] for k in npz.files}
    content["rgb_static"] = 255 - content["rgb_static"]
    np.savez_compressed(path, **content)
    new = open_frame_cache(CalvinSplit(calvin_dir / "training"), S, cfg.data.cache_dir)
    assert new.built and new.dir != old.dir
    assert _cache_dirs(cfg.data.cache_dir) == [new.dir]  # the superseded cache is gone
    expected = resize_uint8(torch.from_numpy(content["rgb_static"])[None], S)[0].numpy()
    np.testing.assert_array_equal(new.window(new.row(frame_id), 1)["rgb_static"][0], expected)


def test_added_episode_rebuilds(calvin_dir, cfg):
    split_dir = calvin_dir / "training"
    split = CalvinSplit(split_dir)
    old = open_frame_cache(split, S, cfg.data.cache_dir)
    # a new episode: the first span's frames copied after the last frame id, annotated like it
    first = split.annotations[0]
    start = int(split.ep_start_end_ids.max()) + 1
    for i in range(first.end - first.start + 1):
        shutil.copy(split.frame_path(first.start + i), split.frame_path(start + i))
    episodes = [(a.start, a.end, a.instruction, a.task) for a in split.annotations]
    episodes.append((start, start + first.end - first.start, first.instruction, first.task))
    write_split_metadata(split_dir, episodes, split.statistics(), cfg.data.lang_embedding_dim)
    grown = CalvinSplit(split_dir)
    new = open_frame_cache(grown, S, cfg.data.cache_dir)
    assert new.built and len(new) == len(old) + first.end - first.start + 1
    np.testing.assert_array_equal(
        new.window(new.row(start), 3)["rgb_gripper"], old.window(old.row(first.start), 3)["rgb_gripper"]
    )


BUILDER = """
import sys, time
import vlaops.data.frame_cache as fc
from vlaops.io.calvin import CalvinSplit
fc.BUILD_BATCH = 1
split = CalvinSplit(sys.argv[1])
load = split.load_frame
def slow(*a, **k):  # a build that takes seconds, so that it can be killed in the middle
    time.sleep(0.05)
    return load(*a, **k)
split.load_frame = slow
fc.open_frame_cache(split, int(sys.argv[3]), sys.argv[2])
"""


@pytest.mark.slow  # a kill test, as the others: the quick loop stays under 5 minutes
def test_killed_build_leaves_nothing_taken_as_whole(calvin_dir, cfg):
    cache_dir = Path(cfg.data.cache_dir)
    child = subprocess.Popen([sys.executable, "-c", BUILDER, str(calvin_dir / "training"), str(cache_dir), str(S)])
    try:
        deadline = time.monotonic() + 120
        while not any((p / FRAME_IDS_FILE).is_file() for p in cache_dir.glob(".*.tmp-*")):
            assert child.poll() is None, "the builder ended before it could be killed"
            assert time.monotonic() < deadline, "the builder never started writing"
            time.sleep(0.02)
        time.sleep(0.2)  # some frames written, far from all
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _cache_dirs(cfg.data.cache_dir) == []  # only the hidden temporary is left
    assert list(cache_dir.glob(".*.tmp-*"))
    cache = open_frame_cache(CalvinSplit(calvin_dir / "training"), S, cache_dir)
    assert cache.built and not list(cache_dir.glob(".*.tmp-*"))  # rebuilt; the crashed temporary removed
    assert (cache.dir / META_FILE).is_file()


def test_a_cache_without_its_stamp_is_rebuilt(calvin_dir, cfg):
    split = CalvinSplit(calvin_dir / "training")
    first = open_frame_cache(split, S, cfg.data.cache_dir)
    (first.dir / META_FILE).unlink()
    again = open_frame_cache(split, S, cfg.data.cache_dir)
    assert again.built and again.dir == first.dir and (again.dir / META_FILE).is_file()


def test_workers_read_the_same_windows(calvin_dir, cfg):
    """The memmaps are reopened in each worker process (never pickled as a copy) and read the same bits."""
    cached, _ = _datasets(calvin_dir, cfg)
    main = next(iter(DataLoader(cached, batch_size=6, num_workers=0)))
    worker = next(iter(DataLoader(cached, batch_size=6, num_workers=1)))
    assert torch.equal(main[keys.RGB], worker[keys.RGB]) and torch.equal(main[keys.HAND_RGB], worker[keys.HAND_RGB])


def test_bad_frame_names_the_file(calvin_dir, cfg):
    split = CalvinSplit(calvin_dir / "training")
    path = split.frame_path(split.annotations[0].start + 1)
    path.write_bytes(b"not a zip")
    with pytest.raises(VlaopsError, match=f"{path.name}: not a valid npz"):
        open_frame_cache(split, S, cfg.data.cache_dir)
    path.unlink()
    with pytest.raises(VlaopsError, match=f"{path.name}: frame file missing"):
        open_frame_cache(split, S, cfg.data.cache_dir)
    assert not Path(cfg.data.cache_dir).exists() or _cache_dirs(cfg.data.cache_dir) == []
