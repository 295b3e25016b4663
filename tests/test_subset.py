"""data.subset: few-shot training spans picked per task from a converted split, seeded and nested."""

from __future__ import annotations

from collections import Counter

import pytest

from vlaops.data.config import SubsetConfig
from vlaops.data.subset import select_subset, subset_fingerprint
from vlaops.errors import VlaopsError
from vlaops.io.calvin import Annotation

SPANS = [Annotation(10 * i, 10 * i + 9, f"do {t}", t) for i, t in enumerate(["a"] * 8 + ["b"] * 5 + ["c"] * 1)]


def test_no_subset_keeps_everything():
    assert select_subset(SPANS, SubsetConfig(), "split") == SPANS
    assert subset_fingerprint(SPANS, SubsetConfig()) is None


def test_per_task_takes_n_of_each_task_in_the_splits_order():
    kept = select_subset(SPANS, SubsetConfig(per_task=2), "split")
    assert Counter(a.task for a in kept) == {"a": 2, "b": 2, "c": 1}  # c has only one
    assert kept == sorted(kept, key=lambda a: a.start)


def test_smaller_subsets_lie_inside_larger_ones_of_the_same_seed():
    kept = [set(select_subset(SPANS, SubsetConfig(per_task=n, seed=3), "split")) for n in (1, 2, 4, 8)]
    assert kept[0] <= kept[1] <= kept[2] <= kept[3] and kept[3] == set(SPANS)
    others = {frozenset(select_subset(SPANS, SubsetConfig(per_task=2, seed=s), "split")) for s in range(6)}
    assert len(others) > 1  # the seed picks which


def test_fraction_rounds_and_keeps_at_least_one():
    kept = select_subset(SPANS, SubsetConfig(fraction=0.25), "split")
    assert Counter(a.task for a in kept) == {"a": 2, "b": 1, "c": 1}


def test_the_fingerprint_names_the_spans():
    cfg = SubsetConfig(per_task=1)
    fp = subset_fingerprint(select_subset(SPANS, cfg, "split"), cfg)
    assert fp["spans"] == 3 and fp["spans_per_task"] == {"a": 1, "b": 1, "c": 1} and fp["seed"] == 0
    other = SubsetConfig(per_task=1, seed=1)
    assert subset_fingerprint(select_subset(SPANS, other, "split"), other)["sha256"] != fp["sha256"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_task": 2, "fraction": 0.5}, "not both"),
        ({"per_task": 0}, "positive integer"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SubsetConfig(**kwargs)


def test_a_split_without_spans_is_named():
    with pytest.raises(VlaopsError, match="data/calvin/training: no annotated spans"):
        select_subset([], SubsetConfig(per_task=1), "data/calvin/training")
