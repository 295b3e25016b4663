"""The executor seam (``vlaops.utils.executor``): the same results, merged in item order, from one
local worker, a local pool of two and a local Ray instance, for collect's bags, ingest's episodes and
evaluate's chains; a killed worker's task runs again, a task whose worker dies twice stops the stage
naming it; ``compute.executor=ray`` without Ray or with an unreachable address is one line before any work.

The Ray tests need ``pip install vlaops[ray]`` (they skip without it) and start one local instance of two
CPUs for the module; they are ``slow`` (Ray and its actors take tens of seconds to start on 2 busy cores).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF, path_overrides

import vlaops
from vlaops.cli import main
from vlaops.config import load_config
from vlaops.errors import VlaopsError
from vlaops.utils.executor import ComputeConfig, TaskFailed, map_ordered, resolve_workers, usable_cpus

SRC = Path(vlaops.__file__).resolve().parents[1]
LOCAL = ComputeConfig()


# ---- tasks a worker runs (module level: they travel to local workers and, by value, to Ray actors) ----
def _init_log(path: str) -> None:
    """An initializer that leaves one line per worker it initialised."""
    with open(path, "a") as handle:
        handle.write(f"{os.getpid()}\n")


def _square_in(item: tuple[float, int]) -> tuple[int, int]:
    delay, x = item
    time.sleep(delay)  # later items finish first: the merge must still follow the item order
    return x * x, os.getpid()


def _die_once(item: tuple[str, int]) -> int:
    """Item 3 SIGKILLs its own worker the first time it runs (the marker file remembers), then succeeds."""
    marker, x = item
    if x == 3 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def _die_always(item: tuple[str, int]) -> int:
    attempts, x = item
    if x == 2:
        with open(attempts, "a") as handle:
            handle.write("attempt\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _raise_some(item: tuple[str, int, bool]) -> int:
    """Records that it started, then items 2 and 5 raise. In a pool (``in_pool``) item 2 raises only after
    item 5 has started: while item 2 runs, the other worker takes items 3, 4 and 5 (no item has failed
    before 5), so the later item fails first however busy the machine, and item 2's error must still be
    the one raised (item order)."""
    started, x, in_pool = item
    with open(started, "a") as handle:
        handle.write(f"{x}\n")
    if x == 2 and in_pool:
        deadline = time.monotonic() + 600  # a guard against a hang only: item 5 comes with no time limit
        while "5" not in _lines(Path(started)) and time.monotonic() < deadline:
            time.sleep(0.01)
    if x in (2, 5):
        raise ValueError(f"bad item {x}")
    return x


def _failing_init() -> None:
    raise RuntimeError("no simulator here")


def _name(item: tuple[str, int]) -> str:
    return f"item {item[1]}"


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# ---- the same contract for both executors -------------------------------------------------------------
def check_merge_order_and_one_init_per_worker(compute: ComputeConfig, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    items = [(0.05 * (5 - i), i) for i in range(6)]
    log = tmp_path / "inits"
    out = map_ordered(_square_in, items, 2, initializer=_init_log, initargs=(str(log),), compute=compute)
    assert [x for x, _ in out] == [i * i for i in range(6)]
    pids = {pid for _, pid in out}
    # the initializer (a simulator, a policy) ran once per worker, not once per task
    assert len(_lines(log)) == 2 and set(map(int, _lines(log))) >= pids and os.getpid() not in pids


def check_a_killed_worker_is_retried(compute: ComputeConfig, tmp_path: Path, caplog) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "killed"
    with caplog.at_level(logging.WARNING, logger="vlaops.utils.executor"):
        out = map_ordered(
            _die_once, [(str(marker), i) for i in range(6)], 2, desc="collect", compute=compute, label=_name
        )
    assert marker.exists(), "item 3 never killed its worker: the test proves nothing"
    assert out == [i * 10 for i in range(6)]
    assert "collect: item 3: its worker died" in caplog.text


def check_a_task_whose_worker_dies_twice_is_named(compute: ComputeConfig, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    attempts = tmp_path / "attempts"
    with pytest.raises(TaskFailed) as info:
        map_ordered(_die_always, [(str(attempts), i) for i in range(4)], 2, desc="ingest", compute=compute, label=_name)
    assert str(info.value).startswith("ingest: item 2: its worker died 2 times")
    assert "compute.max_retries=1" in str(info.value) and "\n" not in str(info.value)
    assert len(_lines(attempts)) == 2


def check_an_exception_is_raised_once_in_item_order(compute: ComputeConfig, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    started = tmp_path / "started"
    with pytest.raises(ValueError, match="^bad item 2") as info:
        map_ordered(
            _raise_some, [(str(started), i, True) for i in range(7)], 2, desc="evaluate", compute=compute, label=_name
        )
    assert "(while running evaluate: item 2)" in info.value.__notes__
    assert "bad item 2" in str(info.value.__cause__)  # the worker's traceback
    # each item ran once (an exception is not retried: it would raise again), and none started after item 5
    # failed: item 6 never ran, since item 2 held the other worker until then
    assert sorted(_lines(started)) == ["0", "1", "2", "3", "4", "5"]


def test_default_workers_are_the_usable_cores_capped_by_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # one core's worth of a many-core host
    assert usable_cpus(quota) == 1
    quota.write_text("150000 100000\n")  # 1.5 cores: 2 workers
    assert usable_cpus(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == affinity
    assert usable_cpus(tmp_path / "no-cgroup") == affinity
    assert resolve_workers(None) == usable_cpus() and resolve_workers(3) == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_local_merges_in_item_order_and_initialises_each_worker_once(tmp_path, workers):
    items = [(0.02 * (5 - i), i) for i in range(6)]
    log = tmp_path / "inits"
    out = map_ordered(_square_in, items, workers, initializer=_init_log, initargs=(str(log),))
    assert [x for x, _ in out] == [i * i for i in range(6)]
    assert len(_lines(log)) == workers
    if workers == 2:
        check_merge_order_and_one_init_per_worker(LOCAL, tmp_path / "again")


def test_local_a_killed_worker_is_retried(tmp_path, caplog):
    check_a_killed_worker_is_retried(LOCAL, tmp_path, caplog)


def test_local_a_task_whose_worker_dies_twice_is_named(tmp_path):
    check_a_task_whose_worker_dies_twice_is_named(LOCAL, tmp_path)
    attempts = tmp_path / "no_retry"
    with pytest.raises(TaskFailed, match="died 1 times .*compute.max_retries=0"):
        map_ordered(_die_always, [(str(attempts), i) for i in range(4)], 2, compute=ComputeConfig(max_retries=0))
    assert len(_lines(attempts)) == 1


def test_local_an_exception_is_raised_once_in_item_order(tmp_path):
    check_an_exception_is_raised_once_in_item_order(LOCAL, tmp_path)
    one = tmp_path / "one"
    with pytest.raises(ValueError, match="^bad item 2") as info:  # one worker: in this process, named the same
        map_ordered(_raise_some, [(str(one), i, False) for i in range(7)], 1, desc="evaluate", label=_name)
    assert _lines(one) == ["0", "1", "2"]  # one worker: no item after the failed one starts
    assert "(while running evaluate: item 2)" in info.value.__notes__


def test_local_a_failing_initializer_is_raised(tmp_path):
    with pytest.raises(RuntimeError, match="no simulator here"):
        map_ordered(_square_in, [(0, i) for i in range(4)], 2, initializer=_failing_init)


# A SIGTERM that lands while a worker is being forked, as the stage handles it (vlaops.cli): the script
# signals itself from inside os.fork, in the parent, right after the child exists: the window between the
# fork and the executor's books. Each worker writes its pid when it starts and again after its initializer.
_SIGNAL_IN_FORK = """
import os, signal, sys, time
from vlaops.errors import Terminated
from vlaops.utils.executor import map_ordered
from vlaops.utils.signals import signal_arrived

log = sys.argv[1]

def init():
    with open(log, "a") as f:
        f.write(f"{os.getpid()} initialised\\n")

def forked():
    with open(log, "a") as f:
        f.write(f"{os.getpid()} forked\\n")

def square(x):
    time.sleep(1)
    return x * x

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda s, f: signal_arrived(s))
    os.register_at_fork(after_in_child=forked, after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        map_ordered(square, list(range(4)), 2, initializer=init, method="fork")
    except Terminated:
        print("terminated")
"""


def test_a_signal_while_a_worker_forks_leaves_no_worker_behind(tmp_path):
    """The stage that stops ends every worker it started before it says so: none runs its initializer
    (the workers start with the signals held and take SIGTERM first), none is alive when map_ordered
    has raised."""
    script, log = tmp_path / "signal_in_fork.py", tmp_path / "workers.log"
    script.write_text(_SIGNAL_IN_FORK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(log)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "terminated", proc.stdout + proc.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    assert [line for line in lines if line.endswith("initialised")] == [], lines
    for pid in (int(line.split()[0]) for line in lines):
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the stage: {lines}"


# ---- bad settings: one line, before any work -----------------------------------------------------------
def _stage(stage: str, tmp_path: Path, *extra: str) -> int:
    return main([stage, "--config-dir", str(CONF), *path_overrides(tmp_path), *extra])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("compute.executor=dask", "compute.executor must be one of ['local', 'ray'], got 'dask'"),
        ("compute.ray_address=somewhere", "compute.ray_address must be null"),
        ("compute.max_retries=-1", "compute.max_retries must be >= 0"),
    ],
)
def test_bad_compute_values_are_one_line(tmp_path, capsys, override, expected):
    assert _stage("collect", tmp_path, override) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("stage", ["collect", "ingest", "evaluate", "check"])
def test_executor_ray_without_ray_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, stage):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    assert _stage(stage, tmp_path, "compute.executor=ray") == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"vlaops {stage}: error: compute.executor=ray, but Ray is not installed; pip install vlaops[ray] "
        "(or set compute.executor=local)"
    )
    assert not (tmp_path / "raw").exists() and not (tmp_path / "reports").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens on it once the socket is closed


@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_an_unreachable_ray_address_is_one_line_before_any_work(tmp_path, scheme):
    """In a process of its own: this module's tests may have joined a local Ray instance already."""
    pytest.importorskip("ray")
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlaops.cli",
            "collect",
            "--config-dir",
            str(CONF),
            *path_overrides(tmp_path),
            "compute.executor=ray",
            f"compute.ray_address={address}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert line.startswith(f"vlaops collect: error: compute.ray_address={address}: cannot reach 127.0.0.1:"), (
        proc.stderr
    )
    assert not (tmp_path / "raw").exists()


def test_evaluation_on_cuda_under_ray_is_one_line():
    """Ray's actors ask for no GPU: a CUDA policy there would fail in every actor; it is refused first."""
    from vlaops.eval.runner import RuntimeFactory, run_chains
    from vlaops.sim.config import SimConfig

    with pytest.raises(VlaopsError, match=r"^eval.device=cuda with compute.executor=ray: not supported yet"):
        run_chains(
            RuntimeFactory("unused", device="cuda"),
            SimConfig(),
            [(0, ["lift_blue"])],
            5,
            2,
            compute=ComputeConfig(executor="ray"),
        )


# ---- a local Ray instance -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_compute():
    """One local Ray instance of 2 CPUs for the module; this module's task functions travel by value."""
    ray = pytest.importorskip("ray", reason="pip install vlaops[ray]")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ComputeConfig(executor="ray")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_keeps_the_executor_contract(ray_compute, tmp_path, caplog):
    check_merge_order_and_one_init_per_worker(ray_compute, tmp_path / "order")
    check_a_killed_worker_is_retried(ray_compute, tmp_path / "killed", caplog)
    check_a_task_whose_worker_dies_twice_is_named(ray_compute, tmp_path / "twice")
    check_an_exception_is_raised_once_in_item_order(ray_compute, tmp_path / "raises")


# ---- the three stages: local 1, local 2 and Ray give the same bytes and metrics ------------------------
TASKS = "sim.tasks=[push_red_left,lift_blue,place_blue]"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _executors(request) -> list[tuple[str, int, ComputeConfig]]:
    """(name, workers, compute): a pool of 1 and of 2, and Ray's 2 actors where Ray is installed."""
    runs = [("local-1", 1, LOCAL), ("local-2", 2, LOCAL)]
    try:
        import ray  # noqa: F401
    except ImportError:
        return runs
    return [*runs, ("ray-2", 2, request.getfixturevalue("ray_compute"))]


@pytest.mark.slow
def test_collect_and_ingest_give_the_same_bytes_on_every_executor(tmp_path, request):
    from vlaops.data.ingest import ingest
    from vlaops.sim import collect

    cfg = load_config([*path_overrides(tmp_path), TASKS, "sim.episodes_per_task=1"], CONF)
    bags, episodes = {}, {}
    for name, workers, compute in _executors(request):
        cfg.sim.num_workers = workers
        summary = collect(cfg.sim, tmp_path / name / "raw", compute)
        assert len(summary["episodes"]) == 3
        bags[name] = _tree(tmp_path / name / "raw")
    first = bags["local-1"]
    assert len(first) == 6 and all(tree == first for tree in bags.values()), "collect's bags differ between executors"

    cfg.data.raw_dir = str(tmp_path / "local-1" / "raw")
    for name, workers, compute in _executors(request):
        cfg.data.num_workers = workers
        report = ingest(Path(cfg.data.raw_dir), tmp_path / name / "episodes", cfg.data, compute)
        assert report["summary"]["episodes"] == 3 and not report["quarantined"]
        episodes[name] = _tree(tmp_path / name / "episodes")
    first = episodes["local-1"]
    assert len(first) == 4 and all(tree == first for tree in episodes.values()), "ingest's episodes differ"


@pytest.mark.slow
def test_evaluate_chains_give_the_same_metrics_on_every_executor(tmp_path, request, tiny_policy_dir):
    from vlaops.eval.chains import figures
    from vlaops.eval.runner import ExpertFactory, RuntimeFactory, run_chains
    from vlaops.sim import TabletopEnv, seeded_chains

    cfg = load_config([*path_overrides(tmp_path), TASKS], CONF)
    with TabletopEnv(cfg.sim, render=False) as env:
        chains = seeded_chains(env, list(cfg.sim.tasks), num_chains=4, length=2, seed=1000)
    runs = {}
    for name, workers, compute in _executors(request):
        expert = run_chains(ExpertFactory(), cfg.sim, chains, 120, workers, compute=compute)
        policy = run_chains(RuntimeFactory(str(tiny_policy_dir)), cfg.sim, chains, 6, workers, compute=compute)
        runs[name] = (
            [r.__dict__ for r in expert],
            [r.__dict__ for r in policy],
            figures(expert, 2),
            figures(policy, 2),
        )
    first = runs["local-1"]
    assert [r["completed"] for r in first[0]] == [2, 2, 2, 2]  # the expert completes them: the metrics mean something
    assert all(run == first for run in runs.values()), "chain results differ between executors"
