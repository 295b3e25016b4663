"""Where does the policy lose where the blocks are? Linear probes along the perception path.

A policy that reaches toward the wrong place (docs/results.md: its closest approach is 5-20 cm) may not
know where the blocks are. This fits a ridge regression (alpha by cross-validation) from each stage of the
static camera's path to the three blocks' x, y (``scene_obs``) on the training split's frames and reports
R^2 and the mean position error on the validation split's frames (other scenes):

  * ``pixels``: the model's own input, area-downsampled to 24x24 RGB (what is in the image at all);
  * ``vision_patches``: the vision tower's patch tokens (Kosmos-2's CLIP ViT, last hidden state);
  * ``resampler``: Kosmos-2's image-to-text projection (latent queries attending over the patches), the
    image tokens the text decoder and the action token see;
  * ``action_token``: the frame's feature the LSTM head reads (``VLAPolicy.encode_frames``);
  * the same two first stages of an untrained policy of the same config (seed 0), and the TCP position
    (a probe that ignores the image).

    python bench/perception_probe.py --policy models/policy --calvin data/calvin
    python bench/perception_probe.py --policy runs/noaug/policy --calvin runs/big/calvin --every 10

Prints a table and writes reports/bench/perception_probe.json. CPU, one thread; minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vlaops.io.calvin import TRAINING, VALIDATION, CalvinSplit
from vlaops.model import PolicyRuntime, VLAPolicy
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = ("red", "blue", "green")  # scene_obs[6 + 6 i : 8 + 6 i] is block i's x, y (sim/env.py)


@torch.inference_mode()
def features(
    runtime: PolicyRuntime, init: VLAPolicy, split: CalvinSplit, every: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every ``every``-th frame of each annotated span: the probed representations and the blocks' x, y (N, 6)."""
    out: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "pixels",
            "vision_patches",
            "resampler",
            "action_token",
            "init_vision_patches",
            "init_resampler",
            "tcp",
        )
    }
    targets = []
    for ann in split.annotations:
        ids, mask = runtime.text(ann.instruction)
        for i in range(ann.start, ann.end + 1, every):
            f = split.load_frame(i, ("rgb_static", "rgb_gripper", "scene_obs", "robot_obs"))
            rgb, hand = runtime.images(f)  # (1, 3, S, S): exactly what the policy sees
            out["pixels"].append(torch.nn.functional.interpolate(rgb, size=(24, 24), mode="area").flatten().numpy())
            for prefix, model in (("", runtime.model), ("init_", init)):
                patches = model.backbone.model.vision_model(pixel_values=rgb).last_hidden_state[0, 1:]  # (P, Dv)
                out[f"{prefix}vision_patches"].append(patches.flatten().numpy())
                out[f"{prefix}resampler"].append(model.backbone.encode_images(rgb)[0].flatten().numpy())  # (Q * D,)
            out["action_token"].append(runtime.model.encode_frames(rgb, hand, ids, mask)[0].numpy())
            out["tcp"].append(f["robot_obs"][:3])
            targets.append(np.concatenate([f["scene_obs"][6 + 6 * b : 8 + 6 * b] for b in range(len(BLOCKS))]))
    return {k: np.stack(v) for k, v in out.items()}, np.stack(targets)


def probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import RidgeCV

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    model = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit((x_train - mu) / sd, y_train)
    pred = model.predict((x_val - mu) / sd)
    r2 = 1 - ((pred - y_val) ** 2).sum(0) / ((y_val - y_val.mean(0)) ** 2).sum(0)  # per target
    err = np.sqrt(((pred - y_val).reshape(len(y_val), -1, 2) ** 2).sum(-1))  # (N, blocks) metres
    return {
        "dims": int(x_train.shape[1]),
        "r2": round(float(r2.mean()), 3),
        "error_cm": round(100 * float(err.mean()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="models/policy", help="an exported policy directory")
    parser.add_argument("--calvin", default="data/calvin", help="the CALVIN dataset it was trained on")
    parser.add_argument("--every", type=int, default=5, help="probe every N-th frame of each span")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench" / "perception_probe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime = PolicyRuntime.load(args.policy)
    torch.manual_seed(0)
    init = VLAPolicy.build(runtime.cfg, vocab_size=len(runtime.processor.tokenizer)).eval()
    start = time.perf_counter()
    x_train, y_train = features(runtime, init, CalvinSplit(Path(args.calvin) / TRAINING), args.every)
    x_val, y_val = features(runtime, init, CalvinSplit(Path(args.calvin) / VALIDATION), args.every)
    results = {name: probe(x_train[name], y_train, x_val[name], y_val) for name in x_train}
    spread = round(100 * float(np.sqrt(((y_val - y_val.mean(0)) ** 2).reshape(len(y_val), -1, 2).sum(-1)).mean()), 1)
    print(f"{len(y_train)} training frames, {len(y_val)} validation frames ({time.perf_counter() - start:.0f} s)")
    print(f"{'representation':22s} {'dims':>6s} {'R^2':>7s} {'error':>8s}")
    for name, r in results.items():
        print(f"{name:22s} {r['dims']:6d} {r['r2']:7.3f} {r['error_cm']:6.1f} cm")
    print(f"predicting each block's mean position: R^2 0, error {spread} cm")
    write_json(
        args.out,
        {
            "policy": str(args.policy),
            "calvin": str(args.calvin),
            "every": args.every,
            "frames": {"training": len(y_train), "validation": len(y_val)},
            "mean_position_error_cm": spread,
            "probes": results,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        },
    )


if __name__ == "__main__":
    main()
