"""Ingest throughput: ``vlaops.data.ingest.ingest`` against reading the same bags with ``rosbags`` alone.

The recordings are made here, in a temporary directory, by the pipeline's own recorder
(``vlaops.sim.record.BagWriter``, what ``collect`` writes): rosbag2 bags (``sim.storage``: sqlite3 or
mcap) of the simulator's two cameras as raw ``sensor_msgs/Image`` at its sizes (200 and 84 px, what
conf/sim records), joint states at 4x the control rate, TCP pose, scene state, the absolute action and
the instruction, with the recorder's timing. The frames are real: ``--scenes`` episodes are simulated
and rendered (the arm wandering over the table in a smooth scripted motion for ``--frames`` ticks), and
each of the ``--bags`` bags holds one of them under its own name and start time.

The floor is what any reader of these bags must do, with ``rosbags`` alone: open each bag with
``rosbags.highlevel.AnyReader`` (the bag's own message definitions, the ROS 2 Humble store for the rest,
as ingest does), read every message of the topics ingest maps (data.topics), deserialize each one, and
decode each image the way ingest must (raw: the pixel buffer as an (H, W, 3) uint8 array;
CompressedImage: PIL decode to RGB). It leaves out what only ingest does: hashing the recording,
synchronising the streams to the control ticks, the contract and plausibility checks, and writing the
canonical episode (gzip-compressed HDF5, a third or more of ingest's time), so a ratio of 1 is out of
reach by construction; the goal is at least 0.5. Both run on the same bags, in the same
process counts: one process, and one per core (a fork process pool with one bag per task, as ingest's
executor). frames/s counts the synchronised frames ingest writes (the same number for both); each round
also records CPU seconds (this process and its joined workers), a ratio that other jobs on a shared
machine disturb far less than the wall clock.

The ratio depends on the recordings' length. Opening a bag costs rosbags tens of milliseconds (its
metadata and QoS YAML, deserializers compiled for the bag's own definitions), while a raw image costs
the floor little more than a slice per frame; ingest adds, per frame, the gzip of both cameras into
the episode file and the hash of the bag's bytes. So short bags (the simulator's demos, 24 to 50
ticks) come nearer the floor than long ones: measure the length your rig records (``--frames``).

    python bench/ingest.py                                 # 24 bags of 40 frames, 5 rounds, 1 process and all cores
    python bench/ingest.py --bags 48 --frames 120 sim.storage=mcap
    python bench/ingest.py --profile                       # cProfile of one single-process ingest and one floor pass

Overrides are Hydra overrides of conf/ (``sim.*`` shapes the recordings, ``data.*`` the ingest). Prints
a table and writes reports/bench/ingest.json.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import hashlib
import io
import os
import platform
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from vlaops.config import load_config
from vlaops.data.ingest import ingest, summary_table
from vlaops.sim.config import SimConfig
from vlaops.sim.env import TabletopEnv
from vlaops.sim.record import EPISODE_SPACING_NS, EPOCH_NS, BagWriter, EpisodeRecord, Frame
from vlaops.sim.tasks import get_task
from vlaops.utils.atomic import write_json
from vlaops.utils.executor import resolve_workers, start_method
from vlaops.utils.logging import get_logger

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


# ---- the recordings ------------------------------------------------------------------------------------
def simulate(cfg: SimConfig, frames: int, seed: int, task: str) -> EpisodeRecord:
    """``frames`` ticks of the arm wandering over the blocks from ``reset(seed)``, rendered and recorded
    as ``record_episode`` records a demonstration (obs of tick k, the absolute command computed from it,
    the joint samples between ticks). A smooth motion, not the expert: the expert stops when its task is
    done, and the bench wants a chosen length; the images are the simulator's either way."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    period = rng.uniform(20, 40, 3)  # ticks
    rec = EpisodeRecord("", task, get_task(task).instruction, seed, EPOCH_NS)
    with TabletopEnv(cfg) as env:
        obs = env.reset(seed)
        samples0 = len(env.joint_samples) - 1
        for k in range(frames):
            rel = np.zeros(7)
            rel[:3] = 0.5 * np.sin(2 * np.pi * k / period + phase)  # within the expert's +-0.64
            rel[6] = 1.0 if (k // 20) % 2 == 0 else -1.0  # open, close, open ...
            rec.frames.append(Frame(env.tick, obs, env.rel_to_abs(rel)))
            obs = env.step(rel)
        rec.joint_samples = list(env.joint_samples[samples0:])
    return rec


def make_recordings(cfg: SimConfig, raw: Path, bags: int, frames: int, scenes: int) -> None:
    """``bags`` bags in ``raw`` (``bench_NNNN``), written by the recorder from ``scenes`` simulated episodes."""
    writer = BagWriter(cfg)
    scenes = max(1, min(scenes, bags))
    episodes = [simulate(cfg, frames, seed, cfg.tasks[seed % len(cfg.tasks)]) for seed in range(scenes)]
    for i in range(bags):
        rec = dataclasses.replace(
            episodes[i % scenes], episode_id=f"bench_{i:04d}", start_ns=EPOCH_NS + i * EPISODE_SPACING_NS
        )
        writer.write(rec, raw)


# ---- the floor: rosbags alone --------------------------------------------------------------------------
def _decode(msg: Any, msgtype: str) -> np.ndarray:
    """(H, W, 3) uint8, as ingest must have it: a raw rgb8 buffer as an array, or a decoded JPEG/PNG."""
    if msgtype == "sensor_msgs/msg/CompressedImage":
        with Image.open(io.BytesIO(bytes(msg.data))) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    return (
        np.frombuffer(msg.data, dtype=np.uint8)
        .reshape(msg.height, msg.step)[:, : msg.width * 3]
        .reshape(msg.height, msg.width, 3)
    )


@functools.cache
def _store(name: str) -> Typestore:
    """The default message definitions, built once per process (as ingest's ``io.rosbag2.typestore``)."""
    return get_typestore(Stores(name))


def floor_read(job: tuple[Path, tuple[str, ...], str, str]) -> tuple[int, int]:
    """Read one bag with rosbags alone: every message of ``topics`` deserialized, every image decoded.
    Returns (messages, action messages)."""
    bag, topics, action_topic, store = job
    messages = ticks = 0
    with AnyReader([bag], default_typestore=_store(store)) as reader:
        connections = [c for c in reader.connections if c.topic in topics]
        for conn, _, raw in reader.messages(connections=connections):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.msgtype in IMAGE_TYPES:
                _decode(msg, conn.msgtype)
            elif conn.topic == action_topic:
                ticks += 1
            messages += 1
    return messages, ticks


def run_floor(bags: list[Path], data_cfg, processes: int) -> tuple[float, float, int, int]:
    """Wall and CPU seconds to read every bag with ``processes`` processes (the pool's start-up counted, as
    in ingest), the messages read and the action messages among them."""
    topics = tuple(t for t in dataclasses.asdict(data_cfg.topics).values() if t)
    jobs = [(bag, topics, data_cfg.topics.action, data_cfg.typestore) for bag in bags]
    cpu, start = cpu_seconds(), time.perf_counter()
    if processes == 1:
        counts = [floor_read(job) for job in jobs]
    else:
        with ProcessPoolExecutor(processes, mp_context=get_context(start_method())) as pool:
            counts = list(pool.map(floor_read, jobs))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return seconds, cpu, sum(c[0] for c in counts), sum(c[1] for c in counts)


# ---- vlaops ingest -------------------------------------------------------------------------------------
def run_vlaops(raw: Path, out: Path, data_cfg, num_workers: int) -> tuple[float, float, dict[str, Any], str]:
    """Wall and CPU seconds of one ``ingest`` with ``data.num_workers`` = ``num_workers``, its report, and
    a digest of its output's bytes (the same whatever the number of workers)."""
    shutil.rmtree(out, ignore_errors=True)
    cpu, start = cpu_seconds(), time.perf_counter()
    report = ingest(raw, out, dataclasses.replace(data_cfg, num_workers=num_workers))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    digest = hashlib.sha256()
    for path in sorted(out.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    shutil.rmtree(out)
    return seconds, cpu, report, digest.hexdigest()


def cpu_split() -> tuple[float, float]:
    """CPU seconds used so far (user + system) by this process, and by its children that have ended (pool
    workers are joined when a run ends)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def cpu_seconds() -> float:
    """CPU seconds of this process and its ended children together: a measure the other jobs on a shared
    machine disturb less than wall time."""
    return sum(cpu_split())


# ---- the machine ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def profile(label: str, fn) -> None:
    prof = cProfile.Profile()
    prof.runcall(fn)
    print(f"\n---- cProfile: {label} (top 25 by cumulative time) ----")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=24, help="recordings to ingest")
    parser.add_argument("--frames", type=int, default=40, help="control ticks per recording (the demos average 40)")
    parser.add_argument("--scenes", type=int, default=2, help="distinct simulated episodes the bags are written from")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each measuring floor and vlaops back to back")
    parser.add_argument("--workers", default="1,0", help="data.num_workers values to measure (0: one per core)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one 1-process run of each")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "ingest.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. sim.storage=mcap")
    args = parser.parse_args()
    if args.frames < 1 or args.bags < 1 or args.repeats < 1:
        parser.error("--bags, --frames and --repeats must be at least 1")

    cfg = load_config(args.overrides, ROOT / "conf")
    counts = sorted({resolve_workers(int(w)) for w in args.workers.split(",")})
    get_logger("vlaops").setLevel("WARNING")  # ingest's summary once, below, not once per run
    load_start = os.getloadavg()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        raw, out = tmp / "raw", tmp / "episodes"
        start = time.perf_counter()
        make_recordings(cfg.sim, raw, args.bags, args.frames, args.scenes)
        record_s = time.perf_counter() - start
        bags = sorted(raw.iterdir())
        raw_bytes = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())

        # (wall s, CPU s) per round, per process count
        runs: dict[str, dict[int, list[tuple[float, float]]]] = {
            "floor": {n: [] for n in counts},
            "vlaops": {n: [] for n in counts},
        }
        digests: dict[int, str] = {}
        report: dict[str, Any] = {}
        messages = ticks = 0
        # warm-up of both (imports, the page cache, the default typestores that forked workers inherit)
        run_floor(bags, cfg.data, 1)
        run_vlaops(raw, out, cfg.data, 1)
        for _ in range(args.repeats):
            for n in counts:
                wall, cpu, messages, ticks = run_floor(bags, cfg.data, n)
                runs["floor"][n].append((wall, cpu))
                wall, cpu, report, digests[n] = run_vlaops(raw, out, cfg.data, n)
                runs["vlaops"][n].append((wall, cpu))
        if args.profile:
            profile("floor, 1 process", lambda: run_floor(bags, cfg.data, 1))
            profile("vlaops ingest, 1 process", lambda: run_vlaops(raw, out, cfg.data, 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    frames = report["summary"]["frames"]
    # frames/s by the wall clock (what a user waits for) and frames per CPU-second (steadier on a shared machine)
    fps = {name: {str(n): [frames / wall for wall, _ in per[n]] for n in counts} for name, per in runs.items()}
    fpc = {name: {str(n): [frames / cpu for _, cpu in per[n]] for n in counts} for name, per in runs.items()}
    ratio = {str(n): [v / f for v, f in zip(fps["vlaops"][str(n)], fps["floor"][str(n)])] for n in counts}
    ratio_cpu = {str(n): [v / f for v, f in zip(fpc["vlaops"][str(n)], fpc["floor"][str(n)])] for n in counts}
    medians = {n: round(statistics.median(r), 3) for n, r in ratio.items()}
    load_end = os.getloadavg()
    result = {
        "benchmark": "ingest",
        "floor": "rosbags alone: AnyReader per bag, every message of data.topics deserialized, every image "
        "decoded to (H, W, 3) uint8; no hashing, synchronisation, checks or episode writing",
        "vlaops": "vlaops.data.ingest.ingest(raw, out, data) with data.num_workers = 1 and 0 (one per core)",
        "frames_per_s": {name: {n: spread(v) for n, v in per.items()} for name, per in fps.items()},
        "frames_per_cpu_s": {name: {n: spread(v) for n, v in per.items()} for name, per in fpc.items()},
        "ratio_vlaops_to_floor": {n: spread(r, 3) for n, r in ratio.items()},
        "ratio_vlaops_to_floor_cpu": {n: spread(r, 3) for n, r in ratio_cpu.items()},
        "ratio_median": medians,
        "goal": 0.5,
        "meets_goal": {n: m >= 0.5 for n, m in medians.items()},
        "same_output_bytes_across_processes": len(set(digests.values())) == 1,
        "raw": {
            name: {str(n): [{"wall_s": round(w, 4), "cpu_s": round(c, 4)} for w, c in per[n]] for n in counts}
            for name, per in runs.items()
        },
        "recordings": {
            "bags": len(bags),
            "frames": frames,
            "frames_per_bag": args.frames,
            "messages_read_by_floor": messages,
            "action_messages": ticks,
            "mib": round(raw_bytes / 2**20, 1),
            "storage": cfg.sim.storage,
            "images": f"raw sensor_msgs/Image, {cfg.sim.static_camera_size} and {cfg.sim.gripper_camera_size} px",
            "distinct_scenes": min(args.scenes, args.bags),
            "record_s": round(record_s, 1),
        },
        "ingest_summary": report["summary"],
        "repeats": args.repeats,
        "processes": counts,
        "overrides": args.overrides,
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": resolve_workers(0),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_end],
        },
        "rosbags": version("rosbags"),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    m = result["machine"]
    print(
        f"ingest, {len(bags)} bags x {args.frames} frames ({frames} frames, {result['recordings']['mib']} MiB, "
        f"{cfg.sim.storage}), {args.repeats} rounds; recorded in {record_s:.1f} s"
    )
    print(
        f"machine: {m['cpu']}, {m['cpu_count']} cores ({m['usable_cores']} usable); load average (1 min) "
        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
    )
    print(summary_table(report["summary"]))
    print(f"{'processes':>9}  {'floor frames/s':>20}  {'vlaops frames/s':>20}  {'ratio':>16}  {'ratio, CPU time':>16}")
    print(
        f"{'':>9}  {'min / med / max':>20}  {'min / med / max':>20}  {'min / med / max':>16}  {'min / med / max':>16}"
    )
    for n in counts:
        f, v, r, c = (
            result[key][name][str(n)] if name else result[key][str(n)]
            for key, name in (
                ("frames_per_s", "floor"),
                ("frames_per_s", "vlaops"),
                ("ratio_vlaops_to_floor", None),
                ("ratio_vlaops_to_floor_cpu", None),
            )
        )
        print(
            f"{n:>9}  {f['min']:>6.0f} {f['median']:>6.0f} {f['max']:>6.0f}  {v['min']:>6.0f} {v['median']:>6.0f} "
            f"{v['max']:>6.0f}  {r['min']:>5.2f} {r['median']:>4.2f} {r['max']:>5.2f}  {c['min']:>5.2f} "
            f"{c['median']:>4.2f} "
            f"{c['max']:>5.2f}  {'goal >= 0.5 met' if r['median'] >= 0.5 else 'below the goal of 0.5'}"
        )
    print(
        f"same output bytes with {' and '.join(map(str, counts))} processes: "
        f"{result['same_output_bytes_across_processes']}"
    )
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
