"""Does the action token pick out the block the instruction names? A linear probe at each demo's start.

``bench/grounding.py`` finds the policies reaching for the instructed block in only 0.3-0.75 of episodes.
Two explanations: the feature the LSTM head reads (the action token) does not single out the named block,
or it does and the head does not act on it. This fits a ridge regression (``perception_probe.probe``:
alpha by cross-validation, training-split frames, scored on validation-split frames of other scenes) from
the action token to the named block's x, y, to each other block's x, y, and to the TCP's x, y, on the first
``--frames`` frames of every annotated span only: later frames give the named block away through where the
demonstrating arm has already gone. A token that looks the named block up reads it better than the
others; one that holds all blocks alike reads them equally.

    python bench/lookup_probe.py --policy models/policy --calvin data/calvin
    python bench/lookup_probe.py --policy runs/x/policy --calvin runs/big/calvin --out reports/bench/lookup_x.json

Prints a table and writes reports/bench/lookup_probe.json. CPU, one thread; under a minute on 288 demos.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from perception_probe import BLOCKS, probe

from vlaops.data.dataset import words_named
from vlaops.errors import VlaopsError
from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit
from vlaops.model import PolicyRuntime
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("named_block", "other_block_1", "other_block_2", "tcp")


def named_block(instruction: str) -> int:
    """Index into BLOCKS of the one colour ``instruction`` names."""
    named = words_named(instruction, BLOCKS)
    if len(named) != 1:
        raise VlaopsError(
            f"instruction {instruction!r} names {len(named)} of the blocks {BLOCKS}; the probe needs exactly one"
        )
    return named[0]


@torch.inference_mode()
def features(runtime: PolicyRuntime, split: CalvinSplit, frames: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The action token (N, D) on the first ``frames`` frames of each span, and each target's x, y (N, 2)."""
    tokens, targets = [], {k: [] for k in TARGETS}
    for ann in split.annotations:
        ids, mask = runtime.text(ann.instruction)
        b = named_block(ann.instruction)
        others = [o for o in range(len(BLOCKS)) if o != b]  # in BLOCKS order
        for i in range(ann.start, min(ann.start + frames, ann.end + 1)):
            f = split.load_frame(i, ("rgb_static", "rgb_gripper", "scene_obs", "robot_obs"))
            rgb, hand = runtime.images(f)  # (1, 3, S, S): exactly what the policy sees
            tokens.append(runtime.model.encode_frames(rgb, hand, ids, mask)[0].numpy())
            for name, block in zip(TARGETS, (b, *others)):
                targets[name].append(f["scene_obs"][6 + 6 * block : 8 + 6 * block])
            targets["tcp"].append(f["robot_obs"][:2])
    return np.stack(tokens), {k: np.stack(v) for k, v in targets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="models/policy", help="an exported policy directory")
    parser.add_argument("--calvin", default="data/calvin", help="the CALVIN dataset it was trained on")
    parser.add_argument("--frames", type=int, default=3, help="the first N frames of each span")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench" / "lookup_probe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime = PolicyRuntime.load(args.policy)
    start = time.perf_counter()
    x_train, y_train = features(runtime, CalvinSplit(Path(args.calvin) / TRAINING), args.frames)
    x_val, y_val = features(runtime, CalvinSplit(Path(args.calvin) / VALIDATION), args.frames)
    results = {name: probe(x_train, y_train[name], x_val, y_val[name]) for name in TARGETS}
    print(f"{len(x_train)} training frames, {len(x_val)} validation frames ({time.perf_counter() - start:.0f} s)")
    print(f"{'action token ->':16s} {'R^2':>7s} {'error':>8s}")
    for name, r in results.items():
        print(f"{name:16s} {r['r2']:7.3f} {r['error_cm']:6.1f} cm")
    others = np.mean([results[k]["r2"] for k in ("other_block_1", "other_block_2")])
    print(f"named block minus the other blocks' mean R^2: {results['named_block']['r2'] - others:+.3f}")
    write_json(
        args.out,
        {
            "policy": str(args.policy),
            "calvin": str(args.calvin),
            "frames_per_span": args.frames,
            "frames": {"training": len(x_train), "validation": len(x_val)},
            "probes": results,
            "named_minus_others_r2": round(float(results["named_block"]["r2"] - others), 3),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        },
    )


if __name__ == "__main__":
    main()
