"""Pretraining the tiny Kosmos-2 on the rendered grounded captions, and measuring what it learned.

The model is ``Kosmos2ForConditionalGeneration`` of the tiny architecture (``model.tiny``), trained
with Kosmos-2's own objective: next-token cross-entropy over the caption, location tokens included,
given the image embeddings that the same vision tower and resampler as the policy's produce
(``image_embeds_position_mask`` puts them where the processor's ``<image>`` placeholders are). The
result is saved as microsoft/kosmos-2-patch14-224 is (``save_pretrained`` of the model and of its
``Kosmos2Processor``), so ``model.pretrained_dir`` loads it through the path real weights take.

Measured on held-out scenes (another seed stream): the caption loss, and grounding: prompted with
``<grounding><phrase> the red block</phrase><object>``, the two location tokens it predicts give a box,
scored against the projected box (IoU, centre error) and against the other objects of the view (does
the box centre fall nearest the named object: chance is one over the objects in view).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Kosmos2ForConditionalGeneration

from vlaops.data.transforms import normalize_uint8, resize_uint8
from vlaops.model.backbone import LOCATION_TOKENS, NUM_LOCATION_TOKENS, build_tiny_kosmos
from vlaops.model.config import ModelConfig
from vlaops.model.processor import build_offline_processor
from vlaops.pretrain.captions import (
    GROUNDING,
    Caption,
    captions_for_view,
    vocabulary_corpus,
)
from vlaops.pretrain.config import PretrainConfig
from vlaops.pretrain.scenes import (
    HELDOUT_STREAM,
    TRAIN_STREAM,
    SceneSpec,
    View,
    render_scene,
    sample_scene,
    start_renderer,
)
from vlaops.utils.atomic import atomic_dir
from vlaops.utils.executor import ComputeConfig, map_ordered
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
IGNORE = -100  # the label of a token that carries no loss (image, <s>, padding)
CAPTION_STREAM = 0x434150  # "CAP": the captions' own draws, per scene
EVAL_BATCH = 64
TASK_COLORS = ("red", "green", "blue")  # the tasks' blocks: their grounding is reported apart


@dataclass
class Corpus:
    """Rendered images and their encoded captions: ``images`` (I, 3, S, S) uint8 at model.image_size;
    per example (E) its image, token ids, masks and labels (E, T), right-padded."""

    images: torch.Tensor
    image_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_embeds_position_mask: torch.Tensor
    labels: torch.Tensor
    captions: list[Caption]
    scenes: list[SceneSpec]
    views: list[list[View]]  # per scene, per camera (boxes and visible pixels; images dropped once resized)


def render(
    cfg: PretrainConfig, stream: int, count: int, compute: ComputeConfig | None
) -> list[tuple[SceneSpec, list[View]]]:
    """Draw ``count`` scenes of ``stream`` and render them by ``cfg.cameras`` (in worker processes)."""
    specs = [sample_scene(cfg, stream, i) for i in range(count)]
    sizes = {"static": cfg.static_camera_size, "gripper": cfg.gripper_camera_size}
    views = map_ordered(
        render_scene,
        [(spec, tuple(cfg.cameras), sizes) for spec in specs],
        num_workers=cfg.num_workers,
        initializer=start_renderer,
        desc="pretrain: render",
        unit="scene",
        compute=compute,
        label=lambda task: f"scene {task[0].index}",
    )
    return list(zip(specs, views, strict=True))


def write_captions(
    cfg: PretrainConfig, stream: int, rendered: list[tuple[SceneSpec, list[View]]]
) -> list[list[list[Caption]]]:
    """Per scene, per view, its captions (seeded per scene: the same scene gets the same captions)."""
    out = []
    for spec, views in rendered:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, stream, spec.index, CAPTION_STREAM]))
        out.append([captions_for_view(spec.objects, v, cfg.captions, cfg.min_visible_pixels, rng) for v in views])
    return out


def _resized(views: list[View], size: int) -> torch.Tensor:
    """(V, 3, size, size) uint8: each camera's image resized as the policy's frames are."""
    return torch.cat([resize_uint8(torch.from_numpy(v.image)[None], size) for v in views])


def encode_texts(
    processor: Any, texts: list[str], boxes: list[list | None], num_image_tokens: int, eos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """Captions -> (input ids, image_embeds_position_mask) as ``Kosmos2Processor(images=..., text=...,
    bboxes=...)`` gives them: its ``preprocess_examples`` writes the ``<image>`` placeholders and the
    location tokens, the tokenizer adds <s> (and </s> with ``eos``), and the placeholders take the
    processor's image-token ids. The pixels are not run through its image processor (the policy's torch
    transform makes them), so a corpus is encoded in a second rather than a minute;
    tests/test_pretrain.py holds the two equal."""
    text = processor.preprocess_examples(texts, [0] * len(texts), boxes, num_image_tokens=num_image_tokens)
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=True, return_token_type_ids=False)["input_ids"]
    boi, eoi = tok.convert_tokens_to_ids([processor.boi_token, processor.eoi_token])
    first = tok.unk_token_id + 1  # the processor's default first_image_token_id
    out = []
    for row in ids:
        if not eos:
            row = row[:-1]
        if row[1] != boi or row[2 + num_image_tokens] != eoi:
            raise ValueError(f"unexpected image layout in {tok.convert_ids_to_tokens(row[: num_image_tokens + 4])}")
        row = [row[0], boi, *range(first, first + num_image_tokens), *row[2 + num_image_tokens :]]
        out.append((row, [0, 0, *[1] * num_image_tokens, *[0] * (len(row) - 2 - num_image_tokens)]))
    return out


def _padded(rows: list[tuple[list[int], list[int]]], pad: int, extra: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, attention_mask, image_embeds_position_mask), each (N, longest + ``extra``)."""
    width = max(len(ids) for ids, _ in rows) + extra
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att, pos = torch.zeros((len(rows), width), dtype=torch.long), torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, p) in enumerate(rows):
        ids[r, : len(i)], att[r, : len(i)], pos[r, : len(i)] = torch.tensor(i), 1, torch.tensor(p)
    return ids, att, pos


def encode(
    processor: Any,
    rendered: list[tuple[SceneSpec, list[View]]],
    captions: list[list[list[Caption]]],
    image_size: int,
    num_image_tokens: int,
) -> Corpus:
    """Every (image, caption) pair: ``<s><image>..</image>`` + the caption with its location tokens +
    ``</s>``; labels are the ids except on <s>, the image span and padding."""
    images, image_index, flat = [], [], []
    for (_, views), per_view in zip(rendered, captions, strict=True):
        pixels = _resized(views, image_size)  # (V, 3, S, S)
        for v, caps in enumerate(per_view):
            image_index.extend([len(images)] * len(caps))
            images.append(pixels[v])
            flat.extend(caps)
    rows = encode_texts(processor, [c.text for c in flat], [c.boxes for c in flat], num_image_tokens)
    tok = processor.tokenizer
    ids, att, pos = _padded(rows, tok.pad_token_id)
    labels = ids.clone()
    tags = torch.tensor(tok.convert_tokens_to_ids([processor.boi_token, processor.eoi_token, tok.bos_token]))
    labels[(att == 0) | (pos == 1) | torch.isin(ids, tags)] = IGNORE
    return Corpus(
        images=torch.stack(images),
        image_index=torch.tensor(image_index),
        input_ids=ids,
        attention_mask=att,
        image_embeds_position_mask=pos,
        labels=labels,
        captions=flat,
        scenes=[s for s, _ in rendered],
        views=[[View(v.camera, np.empty(0, np.uint8), v.boxes, v.visible) for v in views] for _, views in rendered],
    )


def _batch(corpus: Corpus, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model inputs of examples ``index``, trimmed to their longest caption."""
    width = int(corpus.attention_mask[index].sum(dim=1).max())
    return {
        "pixel_values": normalize_uint8(corpus.images[corpus.image_index[index]]),
        "input_ids": corpus.input_ids[index, :width],
        "attention_mask": corpus.attention_mask[index, :width],
        "image_embeds_position_mask": corpus.image_embeds_position_mask[index, :width],
        "labels": corpus.labels[index, :width],
    }


def caption_loss(model: Kosmos2ForConditionalGeneration, corpus: Corpus) -> float:
    """Mean next-token cross-entropy per caption token over the whole corpus (no gradient)."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(corpus.input_ids), EVAL_BATCH):
            batch = _batch(corpus, torch.arange(start, min(start + EVAL_BATCH, len(corpus.input_ids))))
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the tokens the shifted loss scores
            total += float(model(**batch).loss) * n
            tokens += n
    return total / max(tokens, 1)


def _box_of_patches(first: int, second: int) -> np.ndarray:
    """Kosmos-2's two location tokens (top-left and bottom-right cells of the 32x32 grid) -> (x1, y1, x2, y2)."""
    side = int(math.isqrt(NUM_LOCATION_TOKENS))
    cell = 1.0 / side
    x1, y1 = (first % side) * cell, (first // side) * cell
    x2, y2 = (second % side + 1) * cell, (second // side + 1) * cell
    return np.array([x1, y1, x2, y2])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _centre(box: np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def locate(
    model: Kosmos2ForConditionalGeneration,
    processor: Any,
    images: torch.Tensor,
    names: list[str],
    num_image_tokens: int,
) -> np.ndarray:
    """Greedy grounding: for each (image (3, S, S) uint8, object name), the box of the two location tokens
    the model predicts after ``<grounding><phrase> the NAME</phrase><object>``: (N, 4) normalised."""
    tok = processor.tokenizer
    first_patch = tok.convert_tokens_to_ids("<patch_index_0000>")
    patch_ids = torch.arange(first_patch, first_patch + NUM_LOCATION_TOKENS)
    boxes = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(names), EVAL_BATCH):
            chunk = range(start, min(start + EVAL_BATCH, len(names)))
            rows = encode_texts(
                processor,
                [f"{GROUNDING}<phrase> the {names[i]}</phrase><object>" for i in chunk],
                [None] * len(chunk),
                num_image_tokens,
                eos=False,
            )
            ids, att, pos = _padded(rows, tok.pad_token_id, extra=2)  # room for the two predicted tokens
            n, lengths = len(chunk), [len(r) for r, _ in rows]
            pixels = normalize_uint8(images[list(chunk)])
            last = torch.tensor(lengths) - 1
            picked = []
            for _ in range(2):  # the top-left cell, then the bottom-right one given it
                logits = model(
                    pixel_values=pixels, input_ids=ids, attention_mask=att, image_embeds_position_mask=pos
                ).logits
                best = logits[torch.arange(n), last][:, patch_ids].argmax(dim=-1)  # (n,) among location tokens
                last = last + 1
                ids[torch.arange(n), last], att[torch.arange(n), last] = patch_ids[best], 1
                picked.append(best)
            boxes.extend(_box_of_patches(int(a), int(b)) for a, b in zip(*picked, strict=True))
    return np.stack(boxes)


def grounding(
    model: Kosmos2ForConditionalGeneration, processor: Any, corpus: Corpus, cfg: PretrainConfig, num_image_tokens: int
) -> dict[str, Any]:
    """Prompt every visible object of every held-out view; box IoU, centre error and whether the box
    centre falls nearest the named object of those in view, over all objects and the tasks' blocks."""
    images, names, prompts = [], [], []
    image = 0
    for spec, views in zip(corpus.scenes, corpus.views, strict=True):
        for view in views:
            seen = [
                i
                for i, (b, n) in enumerate(zip(view.boxes, view.visible, strict=True))
                if b and n >= cfg.min_visible_pixels
            ]
            for i in seen:
                images.append(image)
                names.append(spec.objects[i].name)
                prompts.append((spec.objects[i], np.array(view.boxes[i]), [np.array(view.boxes[j]) for j in seen]))
            image += 1
    if not prompts:
        return {"prompts": 0}
    predicted = locate(model, processor, corpus.images[images], names, num_image_tokens)

    def score(keep: list[int]) -> dict[str, float]:
        ious = [_iou(predicted[k], prompts[k][1]) for k in keep]
        err = [float(np.linalg.norm(_centre(predicted[k]) - _centre(prompts[k][1]))) for k in keep]
        hits, chance = [], []
        for k in keep:
            _, truth, seen = prompts[k]
            if len(seen) < 2:
                continue
            dists = [np.linalg.norm(_centre(predicted[k]) - _centre(b)) for b in seen]
            hits.append(float(np.allclose(seen[int(np.argmin(dists))], truth)))
            chance.append(1.0 / len(seen))
        return {
            "prompts": len(keep),
            "iou": float(np.mean(ious)),
            "iou_at_0_5": float(np.mean([v >= 0.5 for v in ious])),
            "centre_error": float(np.mean(err)),
            "hit_rate": float(np.mean(hits)) if hits else None,
            "chance_hit_rate": float(np.mean(chance)) if chance else None,
        }

    every = list(range(len(prompts)))
    blocks = [k for k in every if prompts[k][0].shape == "block" and prompts[k][0].color in TASK_COLORS]
    return {"all": score(every), "task_blocks": score(blocks) if blocks else {"prompts": 0}}


LOCATION_FREQUENCIES = (1, 2, 4, 8)  # sin/cos of the cell's row and column at these frequencies (16 features)


def init_location_embeddings(model: Kosmos2ForConditionalGeneration, first_id: int, std: float) -> None:
    """Start the 1024 location tokens' embeddings (tied to the output layer) from their place on the grid.

    Kosmos-2 learned what <patch_index_0101> means from 90 million grounded pairs; with random embeddings
    and a few thousand captions each of the 1024 tokens is its own class seen a handful of times, and the
    tiny model memorises them (held-out loss on them above uniform's). Embedding each token as a fixed
    projection of sin/cos features of its row and column makes neighbouring cells near neighbours in the
    output layer, so one caption's box teaches the cells around it too. Only the starting point: the
    embeddings train like any other, and the checkpoint is a plain Kosmos-2.
    """
    side = math.isqrt(NUM_LOCATION_TOKENS)
    rows, cols = (
        torch.arange(NUM_LOCATION_TOKENS) // side,
        torch.arange(NUM_LOCATION_TOKENS) % side,
    )
    u, v = (cols + 0.5) / side, (rows + 0.5) / side
    feats = torch.cat(
        [
            torch.stack([torch.sin(math.pi * f * a), torch.cos(math.pi * f * a)], 1)
            for f in LOCATION_FREQUENCIES
            for a in (u, v)
        ],
        dim=1,
    )  # (1024, 16), each row of norm sqrt(8)
    weight = model.get_input_embeddings().weight
    dim = weight.shape[1]
    basis, _ = torch.linalg.qr(torch.randn(dim, feats.shape[1]))  # (D, 16) orthonormal columns, seeded by the caller
    with torch.no_grad():
        weight[first_id : first_id + NUM_LOCATION_TOKENS] = (
            (feats / math.sqrt(feats.shape[1] / 2)) @ basis.T * (std * math.sqrt(dim))
        )


def _lr(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def pretrain(
    cfg: PretrainConfig,
    arch: ModelConfig,
    out_dir: Path,
    compute: ComputeConfig | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Render, caption, build the processor, train, measure, and save the checkpoint to ``out_dir``
    atomically; the measurements (what reports/pretrain.json holds)."""
    train_scenes = render(cfg, TRAIN_STREAM, cfg.scenes, compute)
    heldout_scenes = render(cfg, HELDOUT_STREAM, cfg.heldout_scenes, compute)
    train_caps = write_captions(cfg, TRAIN_STREAM, train_scenes)
    heldout_caps = write_captions(cfg, HELDOUT_STREAM, heldout_scenes)
    texts = [c.text for scene in train_caps for view in scene for c in view]
    processor = build_offline_processor(
        vocabulary_corpus(texts), vocab_size=arch.vocab_size, image_size=arch.image_size
    )
    q = arch.tiny.latent_query_num
    train = encode(processor, train_scenes, train_caps, arch.image_size, q)
    heldout = encode(processor, heldout_scenes, heldout_caps, arch.image_size, q)
    log.info(
        "pretrain corpus: %d scenes, %d images, %d captions (held out: %d scenes, %d captions); vocabulary %d",
        len(train_scenes),
        len(train.images),
        len(train.captions),
        len(heldout_scenes),
        len(heldout.captions),
        len(processor.tokenizer),
    )

    torch.manual_seed(cfg.seed)
    model = build_tiny_kosmos(arch, len(processor.tokenizer), Kosmos2ForConditionalGeneration)
    init_location_embeddings(
        model, processor.tokenizer.convert_tokens_to_ids(LOCATION_TOKENS[0]), arch.tiny.text_init_std
    )
    before = {
        "heldout_caption_loss": caption_loss(model, heldout),
        "grounding": grounding(model, processor, heldout, cfg, q),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr(s, cfg))
    order = torch.Generator().manual_seed(cfg.seed)
    perm, cursor, window = torch.randperm(len(train.input_ids), generator=order), 0, []
    model.train()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(perm):
            perm, cursor = torch.randperm(len(train.input_ids), generator=order), 0
        index = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        loss = model(**_batch(train, index)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = float(np.mean(window))
            log.info("pretrain step %d/%d: caption loss %.4f", step + 1, cfg.steps, mean)
            if log_metrics is not None:
                log_metrics({"pretrain/train_loss": mean, "pretrain/lr": schedule.get_last_lr()[0]}, step + 1)
            last_window, window = mean, []
    after = {
        "heldout_caption_loss": caption_loss(model, heldout),
        "grounding": grounding(model, processor, heldout, cfg, q),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    kinds = Counter(c.kind for c in train.captions)
    objects = [o for s in train.scenes for o in s.objects]
    return {
        "steps": cfg.steps,
        "train_loss": last_window,
        **after,
        "untrained": before,
        "corpus": {
            "scenes": len(train.scenes),
            "heldout_scenes": len(heldout.scenes),
            "images": len(train.images),
            "captions": len(train.captions),
            "captions_by_kind": dict(sorted(kinds.items())),
            "objects_per_scene": len(objects) / len(train.scenes),
            "colors": sorted({o.color for o in objects}),
            "shapes": sorted({o.shape for o in objects}),
            "vocabulary": len(processor.tokenizer),
        },
    }
