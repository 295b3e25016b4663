"""The executor seam's scaling: evaluation chains per minute and ingest recordings per minute on
1 and 2 local workers, and the per-task overhead of Ray against the local process pool.

- **chains/min**: ``vlaops.eval.runner.run_chains`` with the default tiny policy (random weights, the
  shipped ``conf/model`` at its image size, exported to a temporary directory and loaded by each worker
  once, as ``evaluate`` does) on ``--chains`` seeded chains of ``eval.chain_length``, ``--steps`` steps per
  subtask, rendering both cameras. An untrained policy fails every chain's first subtask, so each chain
  is exactly ``--steps`` policy steps: the work per chain is fixed, and steps/s is reported beside it.
- **recordings/min**: ``vlaops.data.ingest.ingest`` of ``--bags`` bags of ``--frames`` frames, recorded here
  by the pipeline's own recorder (``bench/ingest.py``'s recordings), with its CPU seconds split between
  the main process and the pool's workers (``cpu_seconds_median``: where 2 workers fall short of 2x, is it
  contention, a serial share, or waiting?).
- **per-task overhead**: ``map_ordered`` of ``--tasks`` trivial tasks (return the item) on 2 workers, local
  and Ray (one local Ray instance of 2 CPUs, started here): the start-up of a run (two workers, their
  imports, one task each) and the cost of each further task, from a run of 2 tasks and a run of ``--tasks``.

Each figure is the median of ``--repeats`` rounds (the scaling ratio is 2 workers' rate over 1 worker's,
measured in the same round, so load that comes and goes touches both); the outputs of every run are
checked to be the same (chain results equal, ingest's episode bytes equal). With Ray installed
(``pip install vlaops[ray]``) the chains and the ingest are also timed on 2 Ray actors. The machine,
its load average and ``uptime`` go into the JSON: on a shared machine the ratio is the figure to read.

    # 8 chains x 30 steps, 16 bags x 40 frames, 3 rounds, Ray if installed
    python bench/parallel.py
    python bench/parallel.py --chains 16 --steps 90 --no-ray eval.chain_length=5

Overrides are Hydra overrides of conf/. Writes reports/bench/parallel.json (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ingest.py's recordings

from ingest import cpu_model, cpu_split, make_recordings  # noqa: E402  (bench/ingest.py)

from vlaops.config import load_config, to_container  # noqa: E402
from vlaops.data.ingest import ingest  # noqa: E402
from vlaops.utils.atomic import write_json  # noqa: E402
from vlaops.utils.executor import ComputeConfig, map_ordered, resolve_workers  # noqa: E402
from vlaops.utils.logging import get_logger  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# random weights: what a step costs does not depend on them, and models/pretrained need not exist
RANDOM_WEIGHTS = ["model.pretrained_dir=null"]
CALVIN_CHAINS, CALVIN_STEPS, CALVIN_LENGTH = (
    1000,
    360,
    5,
)  # CALVIN's protocol (evaluation/evaluate_policy.py: EP_LEN 360)


def export_policy(cfg: Any, out: Path) -> Path:
    """The default tiny policy, random weights, exported as ``train`` exports it."""
    import torch

    from vlaops.data.normalization import ActionNormalizer
    from vlaops.model import VLAPolicy, build_offline_processor, save_policy
    from vlaops.sim.tasks import TASKS, get_task

    processor = build_offline_processor(
        [get_task(n).instruction for n in TASKS], vocab_size=cfg.model.vocab_size, image_size=cfg.model.image_size
    )
    torch.manual_seed(0)
    policy = VLAPolicy.build(cfg.model, vocab_size=len(processor.tokenizer))
    return save_policy(
        out,
        policy,
        processor,
        ActionNormalizer(cfg.data.norm_min, cfg.data.norm_max),
        cfg.model,
        extra={"train_config": to_container(cfg)},
    )


def time_chains(
    factory: Any, cfg: Any, chains: list, steps: int, workers: int, compute: ComputeConfig
) -> tuple[float, list]:
    from vlaops.eval.runner import run_chains

    start = time.perf_counter()
    results = run_chains(factory, cfg.sim, chains, steps, workers, desc=None, compute=compute)
    return time.perf_counter() - start, [r.__dict__ for r in results]


def time_ingest(
    raw: Path, out: Path, cfg: Any, workers: int, compute: ComputeConfig
) -> tuple[float, str, dict[str, float]]:
    """Wall seconds, the output's digest, and the CPU seconds of this process and of its worker processes
    (user + system; the pool's workers are reaped when ``ingest`` returns, so RUSAGE_CHILDREN holds them:
    a local pool only, Ray's workers are not children; one local worker runs in this process, no pool).
    Where 2 workers give less than 2x, the CPU split says why: more CPU in all for the same work is
    contention between the workers (or the pool's own cost), CPU in this process is the serial share,
    wall time beyond CPU time / workers is waiting (disk, start-up, an idle worker at the end)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg.data.num_workers = workers
    main0, kids0 = cpu_split()
    start = time.perf_counter()
    ingest(raw, out, cfg.data, compute)
    seconds = time.perf_counter() - start
    main1, kids1 = cpu_split()
    cpu = {"main": main1 - main0, "workers": kids1 - kids0}
    digest = hashlib.sha256()
    for path in sorted(out.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    shutil.rmtree(out)
    return seconds, digest.hexdigest(), cpu


def _identity(x: int) -> int:
    return x


def time_tasks(n: int, compute: ComputeConfig) -> float:
    start = time.perf_counter()
    assert map_ordered(_identity, list(range(n)), 2, compute=compute) == list(range(n))
    return time.perf_counter() - start


def median(values: list[float], digits: int = 3) -> float:
    return round(statistics.median(values), digits)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=8, help="seeded chains per run")
    parser.add_argument("--steps", type=int, default=30, help="eval.max_steps_per_subtask: policy steps per chain here")
    parser.add_argument("--bags", type=int, default=16, help="recordings per ingest run")
    parser.add_argument("--frames", type=int, default=40, help="control ticks per recording (the demos average 40)")
    parser.add_argument("--tasks", type=int, default=200, help="trivial tasks for the per-task overhead")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--no-ray", action="store_true", help="measure the local pool only")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "parallel.json")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of conf/, e.g. eval.chain_length=5 model.image_size=224"
    )
    args = parser.parse_args()
    if min(args.chains, args.steps, args.bags, args.frames, args.repeats) < 1 or args.tasks < 3:
        parser.error("--chains, --steps, --bags, --frames, --repeats must be >= 1 and --tasks >= 3")

    from vlaops.eval.runner import RuntimeFactory
    from vlaops.sim import TabletopEnv, seeded_chains

    get_logger("vlaops").setLevel("WARNING")
    cfg = load_config([*RANDOM_WEIGHTS, *args.overrides], ROOT / "conf")
    local = ComputeConfig()
    executors: dict[str, tuple[int, ComputeConfig]] = {"local-1": (1, local), "local-2": (2, local)}
    ray_init_s = None
    if not args.no_ray:
        try:
            import logging

            import ray
        except ImportError:
            print("Ray is not installed (pip install vlaops[ray]): measuring the local pool only")
        else:
            start = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
            ray_init_s = time.perf_counter() - start
            executors["ray-2"] = (2, ComputeConfig(executor="ray"))
    load_start, uptime_start = os.getloadavg(), uptime()

    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    try:
        factory = RuntimeFactory(str(export_policy(cfg, tmp / "policy")))
        with TabletopEnv(cfg.sim, render=False) as env:
            chains = seeded_chains(
                env, list(cfg.eval.tasks or cfg.sim.tasks), args.chains, cfg.eval.chain_length, cfg.eval.seed
            )
        raw = tmp / "raw"
        make_recordings(cfg.sim, raw, args.bags, args.frames, scenes=2)
        chain_s: dict[str, list[float]] = {name: [] for name in executors}
        ingest_s: dict[str, list[float]] = {name: [] for name in executors}
        ingest_cpu: dict[str, dict[str, list[float]]] = {name: {"main": [], "workers": []} for name in executors}
        chain_results, digests = {}, {}
        time_chains(factory, cfg, chains[:1], args.steps, 1, local)  # warm-up: imports, the page cache
        for _ in range(args.repeats):
            for name, (workers, compute) in executors.items():
                seconds, chain_results[name] = time_chains(factory, cfg, chains, args.steps, workers, compute)
                chain_s[name].append(seconds)
                seconds, digests[name], cpu = time_ingest(raw, tmp / "episodes", cfg, workers, compute)
                ingest_s[name].append(seconds)
                for part, value in cpu.items():
                    ingest_cpu[name][part].append(value)
        steps_per_chain = statistics.mean(sum(r["steps"]) for r in chain_results["local-1"])

        overhead: dict[str, Any] = {}
        for name in [n for n in executors if n != "local-1"]:
            compute = executors[name][1]
            two = [time_tasks(2, compute) for _ in range(args.repeats)]  # both workers started, one task each
            many = [time_tasks(args.tasks, compute) for _ in range(args.repeats)]
            overhead[name] = {
                "startup_s": median(two),
                f"{args.tasks}_tasks_s": median(many),
                "per_task_ms": round(1000 * (median(many) - median(two)) / (args.tasks - 2), 3),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end, uptime_end = os.getloadavg(), uptime()

    chains_per_min = {n: [60 * args.chains / s for s in v] for n, v in chain_s.items()}
    recs_per_min = {n: [60 * args.bags / s for s in v] for n, v in ingest_s.items()}
    scaling = {
        "chains": [b / a for a, b in zip(chain_s["local-2"], chain_s["local-1"])],
        "ingest": [b / a for a, b in zip(ingest_s["local-2"], ingest_s["local-1"])],
    }
    # The projection to CALVIN's protocol: a chain costs steps, each step one render + one policy step;
    # a failed subtask costs all 360 and ends the chain, a completed one fewer. Bounds: every chain ends at
    # its first subtask (360 steps), or every chain runs 5 full subtasks (1800 steps; a real policy lies between).
    steps_per_s_1 = median([args.chains * steps_per_chain / s for s in chain_s["local-1"]])
    efficiency = median(scaling["chains"]) / 2
    projection = {}
    for workers in (1, 2, 8, 32, 128):
        rate = steps_per_s_1 * (1 if workers == 1 else workers * efficiency)
        projection[str(workers)] = {
            f"{label}_h": round(CALVIN_CHAINS * steps / rate / 3600, 2)
            for label, steps in (
                ("first_subtask_fails", CALVIN_STEPS),
                ("all_five_subtasks_full", CALVIN_STEPS * CALVIN_LENGTH),
            )
        }
    result = {
        "benchmark": "parallel",
        "chains": {
            "count": args.chains,
            "chain_length": cfg.eval.chain_length,
            "steps_per_subtask": args.steps,
            "steps_per_chain": steps_per_chain,
            "policy": "default tiny config, random weights",
            "image_size": cfg.model.image_size,
            "per_min": {n: median(v, 2) for n, v in chains_per_min.items()},
            "seconds": {n: [round(x, 2) for x in v] for n, v in chain_s.items()},
            "steps_per_s_1_worker": steps_per_s_1,
            "same_results": all(r == chain_results["local-1"] for r in chain_results.values()),
        },
        "ingest": {
            "bags": args.bags,
            "frames_per_bag": args.frames,
            "storage": cfg.sim.storage,
            "per_min": {n: median(v, 1) for n, v in recs_per_min.items()},
            "seconds": {n: [round(x, 2) for x in v] for n, v in ingest_s.items()},
            "cpu_seconds_median": {
                n: {part: median(v) for part, v in parts.items()}
                for n, parts in ingest_cpu.items()
                if not n.startswith("ray")
            },
            "same_output_bytes": len(set(digests.values())) == 1,
        },
        "scaling_2_vs_1_local": {
            k: {"median": median(v), "rounds": [round(x, 3) for x in v]} for k, v in scaling.items()
        },
        "goal": 1.8,
        "meets_goal": {k: median(v) >= 1.8 for k, v in scaling.items()},
        "per_task_overhead_2_workers": overhead,
        "ray_init_s": None if ray_init_s is None else round(ray_init_s, 1),
        "projection_calvin_1000_chains": {
            "assumptions": f"{CALVIN_CHAINS} chains of {CALVIN_LENGTH}, {CALVIN_STEPS} steps per subtask, at this "
            f"machine's measured {steps_per_s_1} steps/s per worker (this policy and image size) and "
            f"the measured 2-worker efficiency {efficiency:.2f} held at every worker count (a core "
            "per worker, nothing shared); the start-up of the workers and Ray's per-task overhead "
            "left out (milliseconds against chains of minutes)",
            "hours_by_workers": projection,
        },
        "repeats": args.repeats,
        "overrides": args.overrides,
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": resolve_workers(0),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
            "uptime_start": uptime_start,
            "uptime_end": uptime_end,
        },
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    m, c, i = result["machine"], result["chains"], result["ingest"]
    print(
        f"machine: {m['cpu']}, {m['cpu_count']} cores ({m['usable_cores']} usable); load average (1 min) "
        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; {args.repeats} rounds, medians"
    )
    print(
        f"chains: {args.chains} x {cfg.eval.chain_length} tasks, {args.steps} steps per subtask, "
        f"{cfg.model.image_size} px; ingest: {args.bags} bags x {args.frames} frames"
    )
    print(f"{'executor':>9}  {'chains/min':>10}  {'recordings/min':>14}")
    for name in executors:
        print(f"{name:>9}  {c['per_min'][name]:>10.2f}  {i['per_min'][name]:>14.1f}")
    for key, value in result["scaling_2_vs_1_local"].items():
        print(f"2 vs 1 local workers, {key}: {value['median']:.2f}x (rounds {value['rounds']}; goal >= 1.8)")
    for name, cpu in i["cpu_seconds_median"].items():
        print(
            f"ingest on {name}: {i['seconds'][name]} s wall; CPU s: main process {cpu['main']:.2f}, workers "
            f"{cpu['workers']:.2f}"
        )
    for name, o in overhead.items():
        print(f"{name}: start-up {o['startup_s']:.2f} s, then {o['per_task_ms']:.2f} ms per task (2 workers)")
    if ray_init_s is not None:
        print(f"ray.init of a local instance: {ray_init_s:.1f} s")
    print(f"same chain results: {c['same_results']}; same episode bytes: {i['same_output_bytes']}")
    print(
        "projection, CALVIN's 1000 chains (hours; first subtask fails / all five run full): "
        + ", ".join(
            f"{w} workers {p['first_subtask_fails_h']}/{p['all_five_subtasks_full_h']}" for w, p in projection.items()
        )
    )
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
