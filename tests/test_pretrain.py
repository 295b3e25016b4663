"""`vlaops pretrain`: grounded captions of rendered scenes, a tiny Kosmos-2 trained on them, saved as Kosmos-2 is,
and the policy fine-tuning from it through model.pretrained_dir."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, INSTRUCTIONS, SHRINK_MODEL, SHRINK_PRETRAIN, SyntheticWindows, path_overrides, tiny_config

from vlaops.cli import main
from vlaops.errors import VlaopsError
from vlaops.pretrain.captions import captions_for_view, vocabulary_corpus
from vlaops.pretrain.config import PretrainConfig
from vlaops.pretrain.scenes import HELDOUT_STREAM, TRAIN_STREAM, render_scene, sample_scene
from vlaops.sim import layout

# the shrunk model, pretrained: what the policy then loads through model.pretrained_dir
PRETRAINED_MODEL = [o for o in SHRINK_MODEL if not o.startswith("model.pretrained_dir=")]
TASK_COLORS = set(layout.BLOCK_COLORS)


def _pretrain(tmp_path: Path, *extra: str) -> int:
    return main(
        ["pretrain", "--config-dir", str(CONF), *path_overrides(tmp_path), *PRETRAINED_MODEL, *SHRINK_PRETRAIN, *extra]
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """One tiny pretraining through the CLI (6 scenes, 3 steps), with an MLflow store: its tmp root."""
    root = tmp_path_factory.mktemp("pretrain")
    assert _pretrain(root) == 0
    return root


def _rendered(cfg: PretrainConfig, n: int, stream: int = TRAIN_STREAM):
    sizes = {"static": cfg.static_camera_size, "gripper": cfg.gripper_camera_size}
    return [
        (spec, render_scene((spec, tuple(cfg.cameras), sizes)))
        for spec in (sample_scene(cfg, stream, i) for i in range(n))
    ]


def test_pretrain_writes_a_kosmos2_checkpoint_the_policy_fine_tunes(pretrained):
    """The output loads through model.pretrained_dir (the code path of real Kosmos-2 weights): the policy's
    backbone holds the pretrained weights, its processor is the pretrained one, and it trains a step."""
    from safetensors.torch import load_file

    from vlaops.model import VLAPolicy, make_processor
    from vlaops.train.config import TrainConfig
    from vlaops.train.loop import make_loader, train_policy

    out = pretrained / "models" / "pretrained"
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Kosmos2ForConditionalGeneration"]
    report = json.loads((pretrained / "reports" / "pretrain.json").read_text())
    assert report["steps"] == 3 and report["corpus"]["scenes"] == 4 and report["corpus"]["heldout_scenes"] == 2
    assert report["heldout_caption_loss"] < report["untrained"]["heldout_caption_loss"]  # 3 steps at lr 1e-3 do move it
    assert {"iou", "centre_error", "hit_rate", "chance_hit_rate"} <= set(report["grounding"]["all"])

    cfg = tiny_config(pretrained, *PRETRAINED_MODEL, f"model.pretrained_dir={out}")
    processor = make_processor(cfg.model, ["ignored: the checkpoint's own processor is used"])
    assert processor.tokenizer.get_vocab() == make_processor(cfg.model, []).tokenizer.get_vocab()
    torch.manual_seed(0)
    policy = VLAPolicy.build(cfg.model, len(processor.tokenizer))
    saved = load_file(out / "model.safetensors")
    patch = policy.backbone.model.vision_model.model.embeddings.patch_embedding.weight
    assert torch.equal(patch, saved["vision_model.model.embeddings.patch_embedding.weight"])
    embed = policy.backbone.text_embeddings.weight
    assert torch.equal(embed, saved["text_model.model.embed_tokens.weight"])

    m = cfg.model
    data = SyntheticWindows(processor, 2, m.window_size, m.fwd_pred_next_n, m.max_text_len, size=m.image_size)
    train = TrainConfig(max_steps=2, batch_size=2, log_every=1, val_every=100, val_batches=1, save_every=0)
    before = embed.detach().clone()
    result = train_policy(
        policy,
        make_loader(data, train, shuffle=False),
        make_loader(data, train, shuffle=False),
        train,
        lambda *a: None,
        None,
    )
    assert result["steps"] == 2 and np.isfinite(result["final_train_loss"])
    assert not torch.equal(before, policy.backbone.text_embeddings.weight)  # fine-tuned, not frozen


def test_the_vocabulary_reads_any_instruction_without_unk(pretrained):
    """Trained on captions and manipulation words only, never the robot's data: the tasks' instructions are
    whole words, and any ASCII word is spelled from characters."""
    from vlaops.model import load_processor
    from vlaops.sim.tasks import TASKS, get_task

    tok = load_processor(pretrained / "models" / "pretrained").tokenizer
    for text in [get_task(n).instruction for n in TASKS] + INSTRUCTIONS:
        pieces = tok.tokenize(text)
        assert tok.unk_token not in pieces and len(pieces) == len(text.split()), (text, pieces)
    odd = "Grab_the #9 Zebra-mug, quickly!"
    assert tok.unk_token_id not in tok(odd)["input_ids"]


def test_same_seed_same_bytes(pretrained, tmp_path):
    assert _pretrain(tmp_path) == 0
    first, second = pretrained / "models" / "pretrained", tmp_path / "models" / "pretrained"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (pretrained / "reports" / "pretrain.json").read_bytes() == (
        tmp_path / "reports" / "pretrain.json"
    ).read_bytes()


def test_captions_are_grounded_in_kosmos2_format_at_the_projected_boxes():
    """Each <phrase> names an object of the view and its two location tokens are the cells of the object's
    projected box; that box holds every pixel the renderer draws of the object (its segmentation mask)."""
    import pybullet as p
    from transformers.models.kosmos2.processing_kosmos2 import patch_index_to_coordinate

    from vlaops.model.processor import build_offline_processor
    from vlaops.pretrain import scenes
    from vlaops.sim.scene import gripper_camera, static_camera

    cfg = PretrainConfig()
    processor = build_offline_processor(vocabulary_corpus([]), vocab_size=1000, image_size=112)
    kinds, checked = set(), 0
    for index in range(6):
        spec = sample_scene(cfg, TRAIN_STREAM, index)
        views = render_scene((spec, ("static", "gripper"), {"static": 200, "gripper": 84}))
        client, robot = scenes._RENDERER["client"], scenes._RENDERER["robot"]
        for view in views:
            size = 200 if view.camera == "static" else 84
            matrices = static_camera(client) if view.camera == "static" else gripper_camera(client, robot)
            seg = np.asarray(
                p.getCameraImage(size, size, *matrices, renderer=p.ER_TINY_RENDERER, physicsClientId=client)[4]
            )
            seg = seg.reshape(size, size)
            for body, box, visible in zip(scenes._RENDERER["bodies"], view.boxes, view.visible, strict=True):
                ys, xs = np.nonzero(seg == body)
                assert len(xs) == visible
                if visible:  # the drawn pixels lie inside the projected box (one pixel of rasterisation slack)
                    x1, y1, x2, y2 = (np.array(box) * size).tolist()
                    assert x1 - 1 <= xs.min() and xs.max() + 1 <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1
            caps = captions_for_view(
                spec.objects, view, cfg.captions, cfg.min_visible_pixels, np.random.default_rng(index)
            )
            for cap in caps:
                kinds.add(cap.kind)
                text = processor.preprocess_examples(cap.text, None, cap.boxes)
                if cap.boxes is None:
                    assert "<phrase>" not in text and "<patch_index_" not in text and "<grounding>" not in text
                    continue
                assert text.startswith("<grounding>")
                assert re.fullmatch(
                    r"(?:[^<]|<grounding>|<phrase>[^<]+</phrase>"
                    r"<object> <patch_index_\d{4}> <patch_index_\d{4}> </object>)+",
                    text,
                ), text
                entities = re.findall(
                    r"<phrase> ([^<]+)</phrase><object> <patch_index_(\d{4})> <patch_index_(\d{4})> </object>", text
                )
                assert len(entities) == len(cap.boxes)
                for (phrase, first, second), box in zip(entities, cap.boxes, strict=True):
                    named = [o for o, b in zip(spec.objects, view.boxes, strict=True) if b == box]
                    assert named and phrase.split(" ", 1)[1] == named[0].name  # "a red block" / "the red block"
                    # the cells of the location tokens cover the box, less than one cell (1/32) beyond it
                    cell = patch_index_to_coordinate(int(first), int(second), 32)
                    assert all(abs(c - b) < 1 / 32 + 1e-9 for c, b in zip(cell, box, strict=True)), (cell, box)
                    checked += 1
    assert kinds == {"grounded", "refer", "relation", "plain"} and checked > 20


def test_layouts_are_their_own():
    """More objects, colours and shapes than the tasks' three cubes, in a wider area, from a seed stream the
    demonstrations and the evaluation chains do not use; the held-out scenes are others again."""
    from vlaops.sim.config import SimConfig
    from vlaops.sim.env import sample_block_poses

    cfg = PretrainConfig()
    specs = [sample_scene(cfg, TRAIN_STREAM, i) for i in range(40)]
    objects = [o for s in specs for o in s.objects]
    assert {o.color for o in objects} - TASK_COLORS and {o.shape for o in objects} - {"block"}
    assert max(len(s.objects) for s in specs) > 3 and min(len(s.objects) for s in specs) >= 2
    sim = SimConfig()
    assert any(not sim.block_y_range[0] <= o.y <= sim.block_y_range[1] for o in objects)
    for i, spec in enumerate(specs):  # the simulator's scene for the same integer is another one
        xy, _ = sample_block_poses(sim, np.random.default_rng(i))
        assert not {(round(o.x, 6), round(o.y, 6)) for o in spec.objects} & {
            (round(x, 6), round(y, 6)) for x, y in xy.values()
        }
    heldout = [sample_scene(cfg, HELDOUT_STREAM, i) for i in range(40)]
    assert not {s.objects for s in specs} & {s.objects for s in heldout}
    assert sample_scene(cfg, TRAIN_STREAM, 3) == specs[3]  # a scene is a function of (seed, stream, index)
    other = dataclasses.replace(cfg, seed=1)
    assert sample_scene(other, TRAIN_STREAM, 3) != specs[3]


def test_a_failed_pretrain_leaves_the_previous_output_whole(pretrained, tmp_path, monkeypatch):
    """The checkpoint is written into a temporary sibling and renamed at the end: a failure while saving
    keeps the previous directory as it was and leaves no half directory beside it."""
    import shutil

    from transformers import Kosmos2Processor

    out = tmp_path / "models" / "pretrained"
    shutil.copytree(pretrained / "models" / "pretrained", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Kosmos2Processor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        _pretrain(tmp_path, "pretrain.seed=1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["pretrained"]


def test_bad_pretrained_dir_stops_in_one_line(pretrained, tmp_path):
    """Not a Kosmos-2 directory, a tokenizer without the location tokens, or another architecture than
    model.tiny: one line naming the directory, before any training."""
    import shutil

    from vlaops.model import VLAPolicy, make_processor

    good = pretrained / "models" / "pretrained"
    cfg = tiny_config(pretrained, *PRETRAINED_MODEL, f"model.pretrained_dir={good}")

    other = tmp_path / "other"
    shutil.copytree(good, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(VlaopsError, match=r"pretrained_dir=.*other: config.json has model_type 'clip', not 'kosmos-2'"):
        make_processor(dataclasses.replace(cfg.model, pretrained_dir=str(other)), [])

    plain = tmp_path / "plain"
    shutil.copytree(good, plain)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        (plain / name).unlink(missing_ok=True)
    _tokenizer_without_kosmos_tokens(good).save_pretrained(plain)
    with pytest.raises(
        VlaopsError, match=r"plain: the tokenizer lacks 1029 of Kosmos-2's grounding and location tokens"
    ):
        make_processor(dataclasses.replace(cfg.model, pretrained_dir=str(plain)), [])

    wider = dataclasses.replace(cfg.model, tiny=dataclasses.replace(cfg.model.tiny, text_layers=3))
    with pytest.raises(VlaopsError, match=r"not the architecture of model.tiny.*text_config.layers 2 != 3"):
        VLAPolicy.build(wider, 2000)


def test_train_with_a_tokenizer_lacking_location_tokens_stops_before_training(
    pretrained, cfg, calvin_dir, tmp_path, capsys
):
    """Through the CLI: `vlaops train` on real data names the directory in one line and trains nothing."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(pretrained / "models" / "pretrained", plain)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (plain / name).unlink(missing_ok=True)
    _tokenizer_without_kosmos_tokens(pretrained / "models" / "pretrained").save_pretrained(plain)
    capsys.readouterr()
    rc = main(
        [
            "train",
            "--config-dir",
            str(CONF),
            *path_overrides(tmp_path),
            *PRETRAINED_MODEL,
            f"model.pretrained_dir={plain}",
            "train.max_steps=2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "the tokenizer lacks 1029 of Kosmos-2's" in err[0], err
    assert not Path(cfg.paths.model_dir).exists() and not Path(cfg.paths.checkpoint_dir).exists()


def test_train_fine_tunes_the_pretrained_dir_through_the_cli(pretrained, cfg, calvin_dir, tmp_path):
    """`vlaops train` on real (converted) data starts from the pretrained checkpoint and exports a policy."""
    from vlaops.model import PolicyRuntime

    out = pretrained / "models" / "pretrained"
    over = [*path_overrides(tmp_path), *PRETRAINED_MODEL, f"model.pretrained_dir={out}"]
    assert main(["train", "--config-dir", str(CONF), *over, "train.max_steps=2", "train.batch_size=2"]) == 0
    exported = json.loads((Path(cfg.paths.model_dir) / "train_config.json").read_text())
    assert exported["model"]["pretrained_dir"] == str(out) and exported["model"]["backbone"] == "tiny"
    assert PolicyRuntime.load(cfg.paths.model_dir).cfg.max_text_len == cfg.model.max_text_len


KOSMOS_TAGS = (
    "<grounding>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "<image>",
    "</image>",
    "</doc>",
    "</chunk>",
    "</line>",
    "</delimiter_of_multi_objects/>",
)


def _tokenizer_without_kosmos_tokens(pretrained_dir: Path):
    """The pretrained dir's own Unigram tokenizer without the tags and location tokens Kosmos2Processor added."""
    from tokenizers import Tokenizer
    from transformers import XLMRobertaTokenizerFast

    data = json.loads((pretrained_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [
        t
        for t in data["added_tokens"]
        if t["content"] not in KOSMOS_TAGS and not t["content"].startswith("<patch_index_")
    ]
    special = dict(
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    return XLMRobertaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), **special)
