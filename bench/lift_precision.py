"""How precise must a lift be, and how precise is the policy? The grasp, measured in closed loop.

A lift succeeds only if the open fingers come down around the block. Two measurements on the same kind of
episode (``lift_{red,green,blue}`` in turn, each from a freshly reset scene, seeds from ``--seed``):

- ``--expert``: the scripted expert with its grasp deliberately moved by D cm in x-y (a random direction
  per episode) and turned by Y degrees, for each ``Y:D`` of ``--offsets``: the tolerance a lift allows.
- ``--policy DIR``: a trained policy; at the first step it commands the gripper closed, the x-y distance
  from its TCP to the named block's centre, the height above it and the yaw error (a cube repeats every
  90 degrees). Successes and failures side by side say which error the failures have.

    python bench/lift_precision.py --expert
    python bench/lift_precision.py --policy models/policy --episodes 18

Prints a line per setting or episode and writes reports/bench/lift_precision.json. The expert needs no
rendering (seconds); a policy about 5 s per episode on a 2-core EPYC.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlaops.config import load_config
from vlaops.eval.env import StepPolicy
from vlaops.eval.reference import ExpertPolicy
from vlaops.io.calvin_spec import wrap_angle
from vlaops.sim import TabletopEnv, get_task
from vlaops.sim.expert import ScriptedExpert
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
LIFTS = ("lift_red", "lift_green", "lift_blue")
DEFAULT_OFFSETS = "0:0,0:1,0:2,0:3,0:4,15:0,30:0,45:0,15:2"


class OffsetGrasp(ExpertPolicy):
    """The expert for a lift, its grasp (the waypoints above, at and lifting from the block) moved by
    ``dxy`` (m, (2,)) and turned by ``dyaw`` (rad): an able policy that misses by a known amount."""

    def __init__(self, env: TabletopEnv, dxy: np.ndarray, dyaw: float) -> None:
        super().__init__(env)
        self.dxy, self.dyaw = np.asarray(dxy, dtype=float), float(dyaw)

    def plan(self, task: str, info: dict[str, Any]) -> ScriptedExpert:
        expert = super().plan(task, info)
        shift = np.array([*self.dxy, 0.0])
        expert.waypoints = [expert.waypoints[0]] + [
            dataclasses.replace(wp, pos=wp.pos + shift if i < 3 else wp.pos, yaw=wp.yaw + self.dyaw)
            for i, wp in enumerate(expert.waypoints[1:])
        ]
        return expert


def lift(env: TabletopEnv, policy: StepPolicy, seed: int, task_name: str, max_steps: int) -> dict[str, Any]:
    """One lift from ``env.reset(seed)``: success, and the grasp error at the first step the policy
    commands the gripper closed (None where it never does)."""
    task = get_task(task_name)
    obs = env.reset(seed)
    policy.reset()
    start = env.get_info()
    grasp: dict[str, float] | None = None
    success = False
    for _ in range(max_steps):
        action = policy.step(obs, task.instruction)
        info = env.get_info()
        if grasp is None and action[-1] < 0:
            tcp, block = np.asarray(info["tcp_pos"], dtype=float), info["blocks"][task.block]
            centre = np.asarray(block["pos"], dtype=float)
            yaw = float(wrap_angle(4 * (float(info["tcp_euler"][2]) - float(block["euler"][2])))) / 4
            grasp = {
                "xy_cm": round(100 * float(np.linalg.norm(tcp[:2] - centre[:2])), 1),
                "dz_cm": round(100 * float(tcp[2] - centre[2]), 1),
                "yaw_deg": round(abs(float(np.degrees(yaw))), 1),
            }
        obs = env.step(action)
        if task.success(start, env.get_info()):
            success = True
            break
    return {"seed": seed, "task": task_name, "success": success, "grasp": grasp}


def tolerance(
    env: TabletopEnv, offsets: list[tuple[float, float]], episodes: int, seed: int, max_steps: int
) -> list[dict[str, Any]]:
    """The expert's lift success with its grasp ``(yaw degrees, x-y cm)`` off, for each offset."""
    rows = []
    for yaw_deg, xy_cm in offsets:
        rng = np.random.default_rng(seed)
        ok = 0
        for i in range(episodes):
            angle, sign = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
            dxy = xy_cm / 100 * np.array([np.cos(angle), np.sin(angle)])
            ok += lift(env, OffsetGrasp(env, dxy, sign * np.radians(yaw_deg)), seed + i, LIFTS[i % 3], max_steps)[
                "success"
            ]
        rows.append({"yaw_off_deg": yaw_deg, "xy_off_cm": xy_cm, "success": ok, "episodes": episodes})
        print(f"grasp {yaw_deg:4.0f} deg, {xy_cm:3.1f} cm off: {ok}/{episodes}", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median grasp errors of the successful and the failed lifts (those that closed the gripper)."""

    def median(ok: bool, key: str) -> float | None:
        values = [r["grasp"][key] for r in rows if r["success"] == ok and r["grasp"] is not None]
        return float(np.median(values)) if values else None

    return {
        "episodes": len(rows),
        "success": sum(r["success"] for r in rows),
        "never_closed": sum(r["grasp"] is None for r in rows),
        "median_xy_cm": {"success": median(True, "xy_cm"), "failure": median(False, "xy_cm")},
        "median_yaw_deg": {"success": median(True, "yaw_deg"), "failure": median(False, "yaw_deg")},
    }


def _offsets(text: str) -> list[tuple[float, float]]:
    return [(float(y), float(d)) for y, d in (item.split(":") for item in text.split(","))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--policy", help="an exported policy directory")
    who.add_argument("--expert", action="store_true", help="the expert's tolerance to a grasp off by --offsets")
    parser.add_argument("--offsets", default=DEFAULT_OFFSETS, help="YAW_DEG:XY_CM,... (--expert)")
    parser.add_argument("--episodes", type=int, default=24, help="lift episodes (per offset with --expert)")
    parser.add_argument("--seed", type=int, default=5000, help="the first reset seed")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench" / "lift_precision.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. sim.block_yaw_range=0.3")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.overrides, ROOT / "conf")
    steps = cfg.eval.max_steps_per_subtask
    with TabletopEnv(cfg.sim, render=not args.expert) as env:
        if args.expert:
            report: dict[str, Any] = {
                "policy": "expert",
                "tolerance": tolerance(env, _offsets(args.offsets), args.episodes, args.seed, steps),
            }
        else:
            from vlaops.model import PolicyRuntime

            policy = PolicyRuntime.load(Path(args.policy), torch.device("cpu"))
            rows = []
            for i in range(args.episodes):
                rows.append(lift(env, policy, args.seed + i, LIFTS[i % 3], steps))
                print(rows[-1], flush=True)
            report = {"policy": str(args.policy), "summary": summarise(rows), "episodes": rows}
            print(report["summary"])
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    write_json(args.out, report)


if __name__ == "__main__":
    main()
