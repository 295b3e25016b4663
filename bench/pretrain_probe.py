"""Does the pretrained tiny Kosmos-2 read the image? Its caption loss on held-out scenes, with the right images
and with each caption given another caption's image.

`vlaops pretrain` reports the caption loss and greedy grounding (reports/pretrain.json); this splits the
held-out loss into the location tokens (<patch_index_....>, uniform: ln 1024 = 6.93 nats) and the other
caption tokens, teacher-forced, and measures both again with the images shuffled among the captions. The
increase is what the image contributes: zero for a model that ignores it. Held-out scenes of the stage's
own held-out seed stream, rendered as the stage renders them.

    python bench/pretrain_probe.py models/pretrained --scenes 16

Prints the four losses and writes reports/bench/pretrain_probe.json. CPU, one thread; under a minute.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from transformers import Kosmos2ForConditionalGeneration

from vlaops.model import load_processor
from vlaops.model.backbone import LOCATION_TOKENS, NUM_LOCATION_TOKENS, check_pretrained_dir
from vlaops.pretrain import training
from vlaops.pretrain.config import PretrainConfig
from vlaops.pretrain.scenes import HELDOUT_STREAM
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]


def losses(model, corpus: training.Corpus, first: int, perm: torch.Tensor | None = None) -> dict[str, float]:
    """Mean cross-entropy on the location tokens and on the other caption tokens, and the location accuracy."""
    batch = training._batch(corpus, torch.arange(len(corpus.input_ids)))
    if perm is not None:
        batch["pixel_values"] = batch["pixel_values"][perm]
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=training.IGNORE
    ).view(labels.shape)
    loc = (labels >= first) & (labels < first + NUM_LOCATION_TOKENS)
    other = (labels != training.IGNORE) & ~loc
    return {
        "location_loss": float(ce[loc].mean()),
        "other_loss": float(ce[other].mean()),
        "location_accuracy": float((logits.argmax(-1)[loc] == labels[loc]).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrained_dir", type=Path)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="pretrain.seed of the held-out stream")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "pretrain_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = check_pretrained_dir(args.pretrained_dir)
    model = Kosmos2ForConditionalGeneration.from_pretrained(str(path), local_files_only=True).eval()
    processor = load_processor(path)
    cfg = PretrainConfig(seed=args.seed, heldout_scenes=args.scenes, num_workers=1)
    rendered = training.render(cfg, HELDOUT_STREAM, args.scenes, None)
    captions = training.write_captions(cfg, HELDOUT_STREAM, rendered)
    corpus = training.encode(
        processor, rendered, captions, model.config.vision_config.image_size, model.config.latent_query_num
    )
    first = processor.tokenizer.convert_tokens_to_ids(LOCATION_TOKENS[0])
    perm = torch.randperm(len(corpus.input_ids), generator=torch.Generator().manual_seed(0))
    result = {
        "pretrained_dir": str(args.pretrained_dir),
        "scenes": args.scenes,
        "captions": len(corpus.captions),
        "images": losses(model, corpus, first),
        "shuffled_images": losses(model, corpus, first, perm),
        "machine": platform.processor() or platform.machine(),
    }
    for name in ("images", "shuffled_images"):
        print(name, {k: round(v, 4) for k, v in result[name].items()})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
