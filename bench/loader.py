"""Training data throughput: the packed frame cache against one compressed npz per frame per sample.

The baseline is RoboVLMs' CALVIN loader, and ours before the cache: every sample opens the W frame
files (``episode_%07d.npz``), inflates both cameras and bicubic-resizes 2W images to the model's size.
The vlaops loader reads the same windows from the split's frame cache (data/frame_cache.py: decoded
and resized once, memory-mapped). Both give the same bits (checked here on the first window);
augmentation (random shift, colour jitter) runs per sample in both, as in training.

Measured in one run, on the same split and config:
  * loader samples/s, training DataLoader (shuffle, augment, ``train.batch_size``), for each
    ``--workers`` count, npz and cache;
  * train steps/s of the optimisation loop (``train_policy``, the default model), npz with 0 workers
    (before) and the cache with each worker count (after); steady state, between the first and the
    last ``log_every`` callback, so worker start-up and the first step's allocations are left out.

    dvc repro normalize && python bench/loader.py        # the default tiny model, data/calvin
    python bench/loader.py --samples 400 --steps 60 model.image_size=112
    python bench/loader.py --threads 1     # on a CPU shared with other jobs (see the JSON's load average)

Overrides are Hydra overrides of conf/. The cache is built into a fresh temporary directory (its build
time is reported) and removed afterwards. Prints a table and writes reports/bench/loader.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlaops.config import load_config
from vlaops.data import keys
from vlaops.data.dataset import CalvinWindowDataset, aux_dims_from_data, make_window_dataset
from vlaops.data.frame_cache import open_frame_cache
from vlaops.data.normalization import NORMALIZATION_FILE, ActionNormalizer
from vlaops.io.calvin import TRAINING, CalvinSplit
from vlaops.model import VLAPolicy, make_processor
from vlaops.train.config import TrainConfig
from vlaops.train.loop import make_loader, train_policy
from vlaops.train.setup import apply_train_setup
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]

# random weights: what a step costs does not depend on them, and models/pretrained need not exist
RANDOM_WEIGHTS = ["model.pretrained_dir=null"]


def samples_per_s(dataset: CalvinWindowDataset, cfg: TrainConfig, workers: int, samples: int) -> float:
    """Steady-state samples/s of the training DataLoader: the first batch (worker start-up) is not timed."""
    loader = make_loader(dataset, dataclasses.replace(cfg, num_workers=workers), shuffle=True)
    batches = max(1, samples // cfg.batch_size)
    torch.manual_seed(cfg.seed)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += batch[keys.RGB].shape[0]
    elapsed = time.perf_counter() - start
    del it, loader
    return n / elapsed


def train_steps_per_s(dataset: CalvinWindowDataset, run_cfg, processor, workers: int, steps: int) -> float:
    """Steady-state optimizer steps/s of ``train_policy`` on ``dataset`` with ``workers`` loader workers."""
    cfg = dataclasses.replace(
        run_cfg.train, num_workers=workers, max_steps=steps, log_every=10, val_every=10**9, save_every=0
    )
    torch.manual_seed(run_cfg.seed)
    policy = VLAPolicy.build(run_cfg.model, vocab_size=len(processor.tokenizer))
    apply_train_setup(policy, cfg.train_setup)
    stamps: list[tuple[int, float]] = []
    train_policy(
        policy,
        make_loader(dataset, cfg, shuffle=True),
        None,
        cfg,
        lambda m, s: stamps.append((s, time.perf_counter())),
        None,
    )
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    return (s1 - s0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=240, help="samples timed per loader measurement")
    parser.add_argument(
        "--steps", type=int, default=50, help="optimizer steps per train measurement (first 10 untimed)"
    )
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, interleaved; the median is reported")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default); "
        "1 keeps a CPU shared with other jobs from stalling in OpenMP barriers",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "loader.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. model.image_size=112")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cfg = load_config([*RANDOM_WEIGHTS, *args.overrides], ROOT / "conf")
    calvin_dir = Path(cfg.data.calvin_dir)
    split = CalvinSplit(calvin_dir / TRAINING, cfg.data.trust_pickles)
    cfg.model = aux_dims_from_data(cfg.model, split)  # as the train stage: the auxiliary targets the data carries
    normalizer = ActionNormalizer.load(Path(cfg.data.normalized_dir) / NORMALIZATION_FILE)
    processor = make_processor(cfg.model, sorted({a.instruction for a in split.annotations}))

    cache_root = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=Path(cfg.data.cache_dir or "data/cache").parent))
    try:
        start = time.perf_counter()
        frames = open_frame_cache(split, cfg.model.image_size, cache_root)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        open_frame_cache(split, cfg.model.image_size, cache_root)  # reuse: the fingerprint check alone
        reuse_s = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in frames.dir.iterdir())
        npz_ds = make_window_dataset(split, normalizer, processor, cfg.model, cfg.data.augment, None)
        cache_ds = make_window_dataset(split, normalizer, processor, cfg.model, cfg.data.augment, cache_root)
        torch.manual_seed(0)
        a = npz_ds[0][keys.RGB]
        torch.manual_seed(0)
        same_bits = bool(torch.equal(a, cache_ds[0][keys.RGB]))

        loader: dict[str, dict[int, list[float]]] = {"npz": {w: [] for w in workers}, "cache": {w: [] for w in workers}}
        train: dict[str, list[float]] = {"npz_w0": [], **{f"cache_w{w}": [] for w in workers}}
        for _ in range(args.repeats):
            for w in workers:
                loader["npz"][w].append(samples_per_s(npz_ds, cfg.train, w, args.samples))
                loader["cache"][w].append(samples_per_s(cache_ds, cfg.train, w, args.samples))
            train["npz_w0"].append(train_steps_per_s(npz_ds, cfg, processor, 0, args.steps))
            for w in workers:
                train[f"cache_w{w}"].append(train_steps_per_s(cache_ds, cfg, processor, w, args.steps))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)

    med = statistics.median
    loader_med = {kind: {str(w): round(med(v), 2) for w, v in per.items()} for kind, per in loader.items()}
    train_med = {k: round(med(v), 3) for k, v in train.items()}
    w0 = str(workers[0])
    best_cache_w = max(workers, key=lambda w: train_med[f"cache_w{w}"])
    result = {
        "benchmark": "loader",
        "baseline": "one compressed npz per frame per sample, decoded and resized every time (RoboVLMs' loader)",
        "loader_samples_per_s": loader_med,
        "loader_speedup_same_workers": round(loader_med["cache"][w0] / loader_med["npz"][w0], 2),
        "loader_speedup_workers": w0,
        "train_steps_per_s": train_med,
        "train_steps_per_s_before": train_med["npz_w0"],
        "train_steps_per_s_after": train_med[f"cache_w{best_cache_w}"],
        "train_speedup": round(train_med[f"cache_w{best_cache_w}"] / train_med["npz_w0"], 2),
        "fastest_num_workers_with_cache": best_cache_w,
        "raw": {
            "loader": {k: {str(w): [round(x, 2) for x in v] for w, v in per.items()} for k, per in loader.items()},
            "train": {k: [round(x, 3) for x in v] for k, v in train.items()},
        },
        "same_bits_as_npz_path": same_bits,
        "cache_build_s": round(build_s, 2),
        "cache_reuse_check_s": round(reuse_s, 3),
        "cache_frames": len(frames),
        "cache_mib": round(cache_bytes / 2**20, 1),
        "training_windows": len(npz_ds),
        "batch_size": cfg.train.batch_size,
        "window_size": cfg.model.window_size,
        "image_size": cfg.model.image_size,
        "samples_per_measurement": args.samples,
        "steps_per_measurement": args.steps,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(
        f"loader, {len(npz_ds)} training windows, batch {cfg.train.batch_size}, window {cfg.model.window_size}, "
        f"{cfg.model.image_size} px:"
    )
    print(
        f"  cache build {build_s:.1f} s for {len(frames)} frames ({result['cache_mib']} MiB); reuse check "
        f"{reuse_s:.2f} s"
    )
    for w in workers:
        n, c = loader_med["npz"][str(w)], loader_med["cache"][str(w)]
        print(f"  samples/s, {w} workers: npz {n:8.1f}   cache {c:8.1f}   {c / n:6.2f}x")
    print(f"  train steps/s: npz, 0 workers {train_med['npz_w0']:.3f} (before)")
    for w in workers:
        print(f"                 cache, {w} workers {train_med[f'cache_w{w}']:.3f}")
    print(
        f"  train speedup {result['train_speedup']:.2f}x (cache, {best_cache_w} workers); same bits as npz: {same_bits}"
    )
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
