"""Sample order and augmentation randomness as pure functions of (seed, epoch, index).

Why: a resumed training must see exactly the batches, and exactly the augmentations, that an
uninterrupted run would have seen. Randomness drawn from the global torch generator cannot give that:
the data loader fetches a batch ahead of the step that uses it (Accelerate looks one batch ahead to
know the end of an epoch), so the generator state a checkpoint saves already includes the next batch's
draws. Here nothing in the data path touches a global generator: :class:`EpochSampler` derives each
epoch's order from (seed, epoch) and yields :class:`SampleKey` s, and the dataset derives each sample's
augmentation generator from the key (:func:`sample_generator`). Resume is then "skip to (epoch,
position)", whatever was prefetched, however many loader workers ran.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: the sample, and the (seed, epoch) its randomness comes from."""

    index: int
    epoch: int = 0
    seed: int = 0


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, platforms and Python's hash randomisation."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(key: SampleKey) -> torch.Generator:
    """The private generator of one sample's augmentation: a function of (seed, epoch, index) only."""
    return torch.Generator().manual_seed(derived_seed(key.seed, key.epoch, key.index))


def as_key(key: int | SampleKey | tuple[int, int, int]) -> SampleKey:
    """A plain integer index (validation, a test, a benchmark) is epoch 0 under seed 0."""
    if isinstance(key, SampleKey):
        return key
    if isinstance(key, tuple):
        return SampleKey(*key)
    return SampleKey(int(key))


class EpochSampler(Sampler[SampleKey]):
    """Every index of a dataset of ``size`` once per epoch, as :class:`SampleKey` s.

    ``shuffle``: epoch e's order is a permutation drawn from a generator seeded by (seed, e), not by any
    state carried from epoch to epoch, so epoch e can be rebuilt from scratch. ``start_at(epoch,
    position)`` makes the next pass begin ``position`` samples into that epoch (a resume);
    ``set_epoch`` (called by Accelerate at every pass) moves to another epoch from its start.
    """

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def start_at(self, epoch: int, position: int) -> None:
        if not 0 <= position <= self.size:
            raise ValueError(f"position {position} outside an epoch of {self.size} samples")
        self.epoch, self.position = epoch, position

    def order(self, epoch: int) -> list[int]:
        """The indices of epoch ``epoch``, in the order they are drawn."""
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        for index in self.order(epoch)[self.position :]:
            yield SampleKey(index, epoch, self.seed)

    def __len__(self) -> int:
        return self.size - self.position
