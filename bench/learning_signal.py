"""Does the policy's loss teach it where the block is? Validation R^2 of the next action's x-y.

The closed-loop failure this measures: a policy that has learned the instruction's mean motion but
not where its block is outputs nearly the same x-y step in every scene, and never reaches the block.
The x-y of the next action (chunk step 0, the one the runtime executes) is the part of the action that
only the camera can tell: the blocks start anywhere on the table. So each variant trains a fresh tiny
policy with the policy's own loss (``VLAPolicy.forward``) on the training split and reports, on
validation windows it never saw:

  * ``val_xy_r2``: R^2 of the predicted next-action x-y at the newest window frame (0: the mean), on
    random windows: much of it is the push direction, which the instruction tells;
  * ``val_start_xy_r2``: the same on the windows that end at a span's first five frames, where the arm
    turns towards its block and only the camera can tell the way;
  * ``val_gripper_accuracy``: the next gripper command.

A plain loop (AdamW at ``train.learning_rate``, no schedule, no augmentation), so the variants differ
only in the overrides they name. The first variant, RoboVLMs' loss on the old defaults (batch 4,
gripper ratio 0.1, a plain mean over the chunk), is the baseline measured in the same run.

    dvc repro normalize && python bench/learning_signal.py          # data/calvin, data/normalized
    python bench/learning_signal.py --steps 400 --seeds 0 1

Prints a table and writes reports/bench/learning_signal.json. Single runs are noisy (the onset of
learning where the block is varies by about 100 steps between seeds): use --seeds for a spread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from vlaops.config import load_config
from vlaops.data import keys
from vlaops.data.dataset import make_window_dataset
from vlaops.data.normalization import ActionNormalizer
from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit
from vlaops.model import VLAPolicy, make_processor
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
START_FRAMES = 5

# (name, overrides): one line of the table each; window 1 isolates the loss from the history
VARIANTS: list[tuple[str, list[str]]] = [
    (
        "w1 b32, ratio 0.1, decay 1.0 (RoboVLMs loss)",
        [
            "model.window_size=1",
            "train.batch_size=32",
            "model.arm_gripper_loss_ratio=0.1",
            "model.chunk_loss_decay=1.0",
        ],
    ),
    (
        "w1 b32, ratio 0.1, decay 0.5",
        ["model.window_size=1", "train.batch_size=32", "model.arm_gripper_loss_ratio=0.1"],
    ),
    ("w1 b32, ratio 0.03, decay 1.0", ["model.window_size=1", "train.batch_size=32", "model.chunk_loss_decay=1.0"]),
    ("w1 b32, ratio 0.03, decay 0.5", ["model.window_size=1", "train.batch_size=32"]),
    ("w1 b4, ratio 0.03, decay 0.5", ["model.window_size=1", "train.batch_size=4"]),
    ("w8 b4, ratio 0.03, decay 0.5", ["train.batch_size=4"]),
    ("w8 b16, ratio 0.03, decay 0.5 (default)", []),
]


@torch.no_grad()
def xy_r2_and_gripper(policy: VLAPolicy, dataset, indices: list[int]) -> tuple[float, float]:
    """(x-y R^2, gripper accuracy) of the next action at the newest frame of the windows ``indices``."""
    policy.eval()
    pred, target, grip = [], [], []
    for batch in DataLoader(Subset(dataset, indices), batch_size=16):
        out = policy(batch)
        pred.append(out["arm"][:, -1, 0, :2])  # (B, 2)
        target.append(batch[keys.ACTION_CHUNK][:, -1, 0, :2])
        opened = out["gripper_logits"][:, -1, 0, 0] > 0
        grip.append((opened == (batch[keys.ACTION_CHUNK][:, -1, 0, -1] > 0.5)).float())
    policy.train()
    p, y = torch.cat(pred), torch.cat(target)
    r2 = 1.0 - float(((p - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    return r2, float(torch.cat(grip).mean())


def start_windows(dataset) -> list[int]:
    """Windows whose newest frame is among the first ``START_FRAMES`` of its span: where a closed-loop run
    begins and the arm turns towards its block (the first steps read the camera only: the instruction
    says which block, not where)."""
    w = dataset.window_size
    return [i for i, (_, t) in enumerate(dataset.index) if t + w - 1 < START_FRAMES]


def run_variant(overrides: list[str], steps: int, seed: int, eval_batches: int) -> dict[str, float]:
    cfg = load_config(overrides, ROOT / "conf")
    calvin, model_cfg = Path(cfg.data.calvin_dir), cfg.model
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir))
    train_split, val_split = CalvinSplit(calvin / TRAINING), CalvinSplit(calvin / VALIDATION)
    processor = make_processor(model_cfg, sorted({a.instruction for a in train_split.annotations}))
    train_ds = make_window_dataset(train_split, normalizer, processor, model_cfg, None, cfg.data.cache_dir)
    val_ds = make_window_dataset(val_split, normalizer, processor, model_cfg, None, cfg.data.cache_dir)
    torch.manual_seed(seed)
    policy = VLAPolicy.build(model_cfg, len(processor.tokenizer)).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    while step < steps:
        for batch in DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, generator=gen):
            loss = policy(batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    train_s = time.perf_counter() - start
    every = torch.randperm(len(val_ds), generator=torch.Generator().manual_seed(1234))[: eval_batches * 16].tolist()
    r2, grip = xy_r2_and_gripper(policy, val_ds, every)
    r2_start, _ = xy_r2_and_gripper(policy, val_ds, start_windows(val_ds))
    return {
        "val_xy_r2": round(r2, 3),
        "val_start_xy_r2": round(r2_start, 3),
        "val_gripper_accuracy": round(grip, 3),
        "train_s": round(train_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-batches", type=int, default=10, help="random validation batches of 16 windows")
    parser.add_argument("--only", type=int, nargs="*", help="indices of VARIANTS to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "learning_signal.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ applied to every variant")
    args = parser.parse_args()

    rows = []
    for i, (name, overrides) in enumerate(VARIANTS):
        if args.only is not None and i not in args.only:
            continue
        runs = [run_variant([*args.overrides, *overrides], args.steps, seed, args.eval_batches) for seed in args.seeds]
        r2s = [r["val_xy_r2"] for r in runs]
        starts = [r["val_start_xy_r2"] for r in runs]
        row = {
            "variant": name,
            "overrides": overrides,
            "runs": runs,
            "val_xy_r2_median": statistics.median(r2s),
            "val_xy_r2_min": min(r2s),
            "val_xy_r2_max": max(r2s),
            "val_start_xy_r2_median": statistics.median(starts),
        }
        rows.append(row)
        print(
            f"{name:45s} val x-y R^2 {row['val_xy_r2_median']:+.3f} [{min(r2s):+.3f}, {max(r2s):+.3f}]  "
            f"at the start {row['val_start_xy_r2_median']:+.3f} [{min(starts):+.3f}, {max(starts):+.3f}]  "
            f"gripper {statistics.median(r['val_gripper_accuracy'] for r in runs):.3f}  "
            f"({statistics.median(r['train_s'] for r in runs):.0f} s per run)",
            flush=True,
        )
    result = {
        "steps": args.steps,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "variants": rows,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
