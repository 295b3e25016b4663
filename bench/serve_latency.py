"""What serving costs: request latency of ``vlaops serve`` over HTTP vs ``PolicyRuntime.step`` in process.

The server runs as ``vlaops serve`` in its own process on 127.0.0.1, as a robot would reach it; this process
times ``PolicyClient.step`` end to end (encode the two camera images, POST, the server's decode +
validation + step, the JSON answer) for each image encoding, and ``PolicyRuntime.step`` on the same
frames loaded from the same export. Both sides step the same episodes (reset between them), taking
turns frame by frame, and must give the same actions (checked). Random weights: the cost does not depend on them.

    python bench/serve_latency.py                          # the default tiny model
    python bench/serve_latency.py --model-dir models/policy --steps 60

Prints p50/p95 per side and the ratios; writes reports/bench/serve_latency.json with the machine's load
average (``uptime``) before and after, since a busy machine shifts both sides.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlaops.config import load_config, to_container
from vlaops.data.normalization import ActionNormalizer
from vlaops.model import PolicyRuntime, VLAPolicy, build_offline_processor, save_policy
from vlaops.serve.client import PolicyClient
from vlaops.sim.tasks import TASKS, get_task
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]

# random weights: what a step costs does not depend on them, and models/pretrained need not exist
RANDOM_WEIGHTS = ["model.pretrained_dir=null"]


def synthetic_episode(steps: int, static: int, gripper: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "rgb_static": rng.integers(0, 256, (static, static, 3), dtype=np.uint8),
            "rgb_gripper": rng.integers(0, 256, (gripper, gripper, 3), dtype=np.uint8),
        }
        for _ in range(steps)
    ]


def export_random_policy(overrides: list[str], out: Path) -> Path:
    """The default tiny policy (conf/ + overrides) with random weights, exported as train exports it."""
    cfg = load_config([*RANDOM_WEIGHTS, *overrides], ROOT / "conf")
    torch.manual_seed(cfg.seed)
    processor = build_offline_processor(
        [get_task(n).instruction for n in TASKS], vocab_size=cfg.model.vocab_size, image_size=cfg.model.image_size
    )
    model = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    return save_policy(
        out,
        model,
        processor,
        ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max),
        cfg.model,
        extra={"train_config": to_container(cfg)},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, threads: int, log_file: Path) -> subprocess.Popen:
    """``vlaops serve`` in its own process with ``threads`` torch threads; returns once /health answers."""
    cmd = [
        sys.executable,
        "-m",
        "vlaops.cli",
        "serve",
        f"paths.model_dir={model_dir}",
        "serve.host=127.0.0.1",
        f"serve.port={port}",
        "serve.device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # torch's intra-op pool
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file.open("w"), stderr=subprocess.STDOUT)
    client = PolicyClient(f"http://127.0.0.1:{port}")
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"vlaops serve exited with {proc.returncode}:\n{log_file.read_text()}")
        try:
            client.health()
            return proc
        except Exception:  # not listening yet
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"vlaops serve did not answer /health within 60 s:\n{log_file.read_text()}")


def time_interleaved(
    policies: dict[str, object], episodes: list[list[dict]], instruction: str
) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Milliseconds of every step of ``episodes`` (reset between them) and the actions, per policy.

    The policies take turns on each frame (in-process, then each HTTP client), so a change in the
    machine's load during the run falls on all of them alike: the machine is shared."""
    times: dict[str, list[float]] = {name: [] for name in policies}
    actions: dict[str, list[np.ndarray]] = {name: [] for name in policies}
    for episode in episodes:
        for policy in policies.values():
            policy.reset()
        for obs in episode:
            for name, policy in policies.items():
                start = time.perf_counter()
                actions[name].append(policy.step(obs, instruction))
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: (np.asarray(times[name]), actions[name]) for name in policies}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per episode")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument(
        "--model-dir", type=Path, help="an exported policy; default: the tiny default with random weights"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each side (default 1: two processes spinning two OpenMP threads each on "
        "a 2-core machine measure their contention, not serving)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "serve_latency.json")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of conf/ for the random policy, e.g. model.image_size=224"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = load()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="serve_latency_") as tmp:
        model_dir = args.model_dir or export_random_policy(args.overrides, Path(tmp) / "policy")
        runtime = PolicyRuntime.load(model_dir, "cpu")
        port = free_port()
        server = start_server(model_dir, port, args.threads, Path(tmp) / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}"
            facts = PolicyClient(url).health()
            episodes = [synthetic_episode(args.steps, 200, 84, seed=i) for i in range(args.episodes)]
            instruction = get_task(sorted(TASKS)[0]).instruction
            clients = {enc: PolicyClient(url, encoding=enc) for enc in ("raw", "png")}
            policies = {"in_process": runtime, **clients}
            time_interleaved(policies, episodes[:1], instruction)  # warm-up: allocator, caches, connections
            timed = time_interleaved(policies, episodes, instruction)
            for client in clients.values():
                client.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    load_after = load()

    local_ms, local_actions = timed.pop("in_process")
    http = timed

    def pct(ms: np.ndarray) -> dict[str, float]:
        return {
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "mean_ms": round(float(ms.mean()), 3),
        }

    result = {
        "benchmark": "serve_latency",
        "baseline": "PolicyRuntime.step in process",
        "in_process": pct(local_ms),
        "http": {},
        "steps": int(local_ms.size),
        "window_size": facts["window_size"],
        "image_size": facts["image_size"],
        "backbone": facts["backbone"],
        "model_dir": str(args.model_dir) if args.model_dir else "random tiny default",
        "overrides": args.overrides,
        "server": "vlaops serve in its own process on 127.0.0.1 (uvicorn, one worker), device cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),  # each side
        "load_average_before": load_before,
        "load_average_after": load_after,
        "uptime_before": uptime_before,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"serve latency, window {facts['window_size']}, {local_ms.size} steps, {args.threads} torch thread(s) per "
        "side, "
        f"load average {load_before} -> {load_after}:"
    )
    print(f"  {'':24} {'p50 ms':>9} {'p95 ms':>9} {'p50 ratio':>10} {'p95 ratio':>10}")
    base = result["in_process"]
    print(f"  {'PolicyRuntime.step':24} {base['p50_ms']:9.2f} {base['p95_ms']:9.2f}")
    for enc, (ms, actions) in http.items():
        stats = pct(ms)
        stats["p50_ratio"] = round(stats["p50_ms"] / base["p50_ms"], 2)
        stats["p95_ratio"] = round(stats["p95_ms"] / base["p95_ms"], 2)
        stats["overhead_p50_ms"] = round(stats["p50_ms"] - base["p50_ms"], 3)
        stats["max_action_difference"] = float(np.max(np.abs(np.stack(actions) - np.stack(local_actions))))
        result["http"][enc] = stats
        print(
            f"  {'HTTP, ' + enc + ' images':24} {stats['p50_ms']:9.2f} {stats['p95_ms']:9.2f} "
            f"{stats['p50_ratio']:9.2f}x {stats['p95_ratio']:9.2f}x   max |action difference| "
            f"{stats['max_action_difference']:.1e}"
        )
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
