"""Rollout videos: the first evaluation chains played again in this process, the static camera recorded
with the instruction and each subtask's outcome written under it, saved as animated GIFs (PIL; no codec).

A chain is a function of its scene seed and the policy (chains.run_chain resets both), and the workers run
the policy on one intra-op thread: played again here on one thread, a chain gives the same actions, so the
video shows the chain that was scored. The caller compares the replay's result with the scored one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlaops.eval.chains import ChainResult, run_chain
from vlaops.eval.env import EvalEnv, StepPolicy, TaskOracle, control_hz, make_env, static_image, task_lookup
from vlaops.utils.atomic import atomic_dir, atomic_file, write_json
from vlaops.utils.logging import get_logger

log = get_logger(__name__)
INDEX_FILE = "index.json"

VIDEO_FRAME_STEP = 2  # every 2nd control step: 15 frames/s of a 30 Hz rollout, half the file
CAPTION_PX = 36
OK_COLOR, FAIL_COLOR = (30, 150, 60), (200, 40, 40)


def record_chain(
    env: EvalEnv,
    policy: StepPolicy,
    seed: int,
    names: Sequence[str],
    get_task: Callable[[str], TaskOracle],
    max_steps: int,
) -> tuple[ChainResult, list[tuple[np.ndarray, int]]]:
    """Play one chain on one thread; returns its result and (static camera frame, subtask index) pairs."""
    frames: list[tuple[np.ndarray, int]] = []
    steps = [0]

    def keep(obs: dict[str, Any], subtask: int) -> None:
        if steps[0] % VIDEO_FRAME_STEP == 0:
            frames.append((static_image(obs).copy(), subtask))
        steps[0] += 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the chain workers run the policy (runner._init_worker): the same actions
    try:
        result = run_chain(env, policy, seed, names, get_task, max_steps, on_step=keep)
    finally:
        torch.set_num_threads(threads)
    return result, frames


def captioned(frames: Sequence[tuple[np.ndarray, int]], result: ChainResult, instructions: Sequence[str]) -> list[Any]:
    """Each frame with a band under it: subtask i/n, its instruction, and whether it succeeded."""
    from PIL import Image, ImageDraw

    out = []
    for frame, i in frames:
        h, w = frame.shape[:2]
        image = Image.new("RGB", (w, h + CAPTION_PX), "white")
        image.paste(Image.fromarray(frame), (0, 0))
        draw = ImageDraw.Draw(image)
        ok = i < result.completed
        draw.text(
            (4, h + 2),
            f"{i + 1}/{len(result.tasks)} {'success' if ok else 'failed'}",
            fill=OK_COLOR if ok else FAIL_COLOR,
        )
        draw.text((4, h + 18), instructions[i][: w // 6], fill=(0, 0, 0))
        out.append(image)
    return out


def save_gif(images: Sequence[Any], path: str | os.PathLike[str], fps: float) -> Path:
    """An endlessly looping animated GIF, written atomically."""
    target = Path(path)
    first, *rest = [im.convert("P", palette=1, colors=255) for im in images]  # 1: Image.Palette.ADAPTIVE
    with atomic_file(target, "wb") as handle:
        first.save(
            handle,
            format="GIF",
            save_all=True,
            append_images=rest,
            duration=int(round(1000 / fps)),
            loop=0,
            optimize=False,
        )
    return target


def write_videos(
    factory: Callable[[Any], StepPolicy],
    sim_cfg: Any,
    chains: Sequence[tuple[int, list[str]]],
    scored: Sequence[ChainResult],
    max_steps: int,
    out_dir: str | os.PathLike[str],
) -> list[dict[str, Any]]:
    """``chain_NNN.gif`` for each of ``chains`` (the first evaluated ones) and ``index.json`` listing them
    (file, seed, tasks, completed, steps, and whether the replay matched the scored chain), into
    ``out_dir`` atomically. ``factory`` builds the policy as the chain workers do."""
    entries = []
    with atomic_dir(out_dir) as tmp:
        if chains:
            with make_env(sim_cfg, render=True) as env:  # the simulator loads only when videos are asked for
                get_task = task_lookup(env)
                policy = factory(env)
                for i, ((seed, names), want) in enumerate(zip(chains, scored)):
                    result, frames = record_chain(env, policy, seed, names, get_task, max_steps)
                    same = (result.completed, result.steps) == (want.completed, want.steps)
                    if not same:
                        log.warning(
                            "video of chain %d (seed %d): the replay completed %d subtasks in %s steps, the scored "
                            "chain %d in %s",
                            i,
                            seed,
                            result.completed,
                            result.steps,
                            want.completed,
                            want.steps,
                        )
                    name = f"chain_{i:03d}.gif"
                    images = captioned(frames, result, [get_task(n).instruction for n in names])
                    save_gif(images, tmp / name, control_hz(sim_cfg) / VIDEO_FRAME_STEP)
                    entries.append(
                        {
                            "file": name,
                            "seed": seed,
                            "tasks": list(names),
                            "completed": result.completed,
                            "steps": result.steps,
                            "same_as_scored": same,
                        }
                    )
        write_json(tmp / INDEX_FILE, entries)
    return entries
