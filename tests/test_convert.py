"""convert + normalize: CALVIN's layout, byte-for-byte what its loaders expect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vlaops.data.normalization import ActionNormalizer
from vlaops.errors import VlaopsError
from vlaops.io import calvin
from vlaops.io.episode import read_episode


def test_layout_and_global_frame_ids(calvin_dir):
    prov = json.loads((calvin_dir / calvin.PROVENANCE).read_text())
    assert prov["format_version"] == calvin.FORMAT_VERSION and prov["splits"] == {"training": 3, "validation": 1}
    next_id = 0
    for split in calvin.SPLITS:
        d = calvin_dir / split
        ids = np.load(d / calvin.EP_START_END_IDS)
        lens = np.load(d / calvin.EP_LENS)
        assert ids.shape[1] == 2 and ids[0, 0] == next_id  # ids continue across splits
        np.testing.assert_array_equal(lens, ids[:, 1] - ids[:, 0] + 1)  # inclusive ends
        next_id = ids[-1, 1] + 1
        for s, e in ids:
            assert calvin.frame_path(d, s).is_file() and calvin.frame_path(d, e).is_file()
            assert not calvin.frame_path(d, e + 1).is_file() or (e + 1) in ids[:, 0]
        stats = yaml.safe_load((d / calvin.STATISTICS).read_text())
        assert stats["robot_obs"][0]["_target_"] == calvin.NORMALIZE_TARGET and len(stats["act_min_bound"]) == 7
    frame = np.load(calvin.frame_path(calvin_dir / "training", 0))
    shapes = {k: frame[k].shape for k in frame.files}
    assert shapes == {
        "actions": (7,),
        "rel_actions": (7,),
        "robot_obs": (15,),
        "scene_obs": (24,),
        "rgb_static": (200, 200, 3),
        "rgb_gripper": (84, 84, 3),
    }
    assert frame["rgb_static"].dtype == np.uint8


def test_rel_actions_follow_calvin_scaling(calvin_dir, cfg):
    prov = json.loads((calvin_dir / calvin.PROVENANCE).read_text())
    ep_id, info = next(iter(prov["episodes"].items()))
    ep = read_episode(Path(cfg.data.episodes_dir) / f"{ep_id}.h5")
    frame = np.load(calvin.frame_path(calvin_dir / info["split"], info["start"] + 3))
    # the synthetic arm moves 1 cm in -y per tick: half of CALVIN's 2 cm unit
    np.testing.assert_allclose(frame["rel_actions"][:6], [0, -0.5, 0, 0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(frame["actions"], ep.action_abs[3])


def test_language_annotations_json_twin_matches_the_pickle(calvin_dir):
    lang_dir = calvin_dir / "training" / calvin.LANG_DIR
    pickled = np.load(lang_dir / calvin.LANG_ANN, allow_pickle=True).item()
    twin = json.loads((lang_dir / calvin.LANG_ANN_JSON).read_text())
    assert pickled["language"]["ann"] == twin["language"]["ann"]
    assert pickled["language"]["emb"].shape == (3, 1, 384)
    np.testing.assert_allclose(pickled["language"]["emb"], np.array(twin["language"]["emb"]), rtol=1e-6)
    assert [tuple(x) for x in twin["info"]["indx"]] == pickled["info"]["indx"]
    val = np.load(calvin_dir / "validation" / calvin.LANG_DIR / calvin.LANG_EMB, allow_pickle=True).item()
    ((task, entry),) = val.items()
    assert entry["emb"].shape == (1, 384) and isinstance(entry["ann"], str)


def test_pickle_only_split_needs_explicit_trust(calvin_dir):
    split_dir = calvin_dir / "training"
    (split_dir / calvin.LANG_DIR / calvin.LANG_ANN_JSON).unlink()  # as real CALVIN ships it
    with pytest.raises(VlaopsError, match="data.trust_pickles=true"):
        calvin.CalvinSplit(split_dir)
    split = calvin.CalvinSplit(split_dir, trust_pickles=True)
    assert len(split.annotations) == 3


def test_normalize_writes_the_shared_normaliser(calvin_dir, cfg):
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    assert (normalizer.norm_min, normalizer.norm_max) == (-0.65, 0.65)
    assert normalizer.stats["count"][0] == 60  # 3 training episodes x 20 frames
    x = np.array([[0.9, -0.3, 0.0, 0.65, -0.65, 0.1, -1.0]])
    y = normalizer.normalize(x)
    np.testing.assert_allclose(y, [[1.0, -0.3 / 0.65, 0.0, 1.0, -1.0, 0.1 / 0.65, 0.0]])
    np.testing.assert_allclose(normalizer.denormalize(y), [[0.65, -0.3, 0.0, 0.65, -0.65, 0.1, -1.0]])


def test_convert_without_episodes_is_named(cfg, tmp_path):
    from vlaops.data.convert import convert

    (tmp_path / "episodes").mkdir()
    with pytest.raises(VlaopsError, match=r"episodes: no canonical episodes \(\*.h5\) found; run ingest first"):
        convert(tmp_path / "episodes", tmp_path / "calvin", cfg.data)
    assert not (tmp_path / "calvin").exists()


def test_convert_bytes_do_not_depend_on_where_the_data_lives(cfg, raw_dir, tmp_path):
    """The same recordings stored in two places, ingested, converted and normalised into two places: every
    byte of the outputs of each stage is equal, and so is the data fingerprint (it hashes content, not
    locations)."""
    import shutil

    from vlaops.data.action_stats import normalize
    from vlaops.data.convert import convert
    from vlaops.data.ingest import ingest

    outs = []
    for where in ("here", "elsewhere/deeper"):
        raw = tmp_path / where / "raw"
        shutil.copytree(raw_dir, raw)
        ingest(raw, tmp_path / where / "episodes", cfg.data)
        convert(tmp_path / where / "episodes", tmp_path / where / "calvin", cfg.data)
        normalize(tmp_path / where / "calvin", tmp_path / where / "normalized", cfg.data)
        outs.append(tmp_path / where / "calvin")
    # ingest's and normalize's outputs too, byte for byte (report included)
    for stage_dir in ("episodes", "normalized"):
        a, b = (tmp_path / where / stage_dir for where in ("here", "elsewhere/deeper"))
        tree_a = {str(p.relative_to(a)): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
        tree_b = {str(p.relative_to(b)): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}
        assert tree_a and tree_a == tree_b, stage_dir
        assert not [name for name, data in tree_a.items() if str(tmp_path).encode() in data], stage_dir
    trees = [{str(p.relative_to(o)): p.read_bytes() for p in sorted(o.rglob("*")) if p.is_file()} for o in outs]
    assert trees[0].keys() == trees[1].keys() and len(trees[0]) > 50
    assert [k for k in trees[0] if trees[0][k] != trees[1][k]] == []
    assert str(tmp_path) not in trees[0][calvin.PROVENANCE].decode()
    assert calvin.dataset_fingerprint(outs[0]) == calvin.dataset_fingerprint(outs[1])
