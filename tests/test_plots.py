"""The PNG plots: each draws, dvc.yaml declares each, and `dvc plots show` / `dvc plots diff` pages render
them offline in a real headless Chromium (Debian's package, installed here when missing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vlaops import plots

ROOT = Path(__file__).resolve().parents[1]
CURVE = {s: {"train/loss": 1.0 / (1 + s), "train/lr": 1e-3 * min(1.0, s / 5)} for s in range(0, 40)}
for _s in (10, 20, 30, 39):
    CURVE[_s]["val/loss"] = 1.2 / (1 + _s)


def _figs(avg: float) -> dict:
    sr = {f"sr_{k}": max(0.0, avg - 0.2 * k) for k in range(1, 4)}
    return {"avg_len": avg, **sr, **{f"{k}_ci": [max(0.0, v - 0.1), min(1.0, v + 0.1)] for k, v in sr.items()}}


def _write_all(out: Path, scale: float = 1.0) -> list[Path]:
    """All five figures from made-up numbers, into ``out``."""
    rng = np.random.default_rng(0)
    episodes = [
        {
            "label": f"episode {i}",
            "recorded": rng.normal(size=(30, 7)) * scale,
            "predicted": rng.normal(size=(30, 7)) * scale,
        }
        for i in range(3)
    ]
    return [
        plots.save(plots.loss_curves(CURVE, "train/loss", "val/loss"), out / plots.LOSS),
        plots.save(plots.learning_rate(CURVE, "train/lr"), out / plots.LEARNING_RATE),
        plots.save(
            plots.sr_by_chain_length({"policy": _figs(0.9 * scale), "reference/expert": _figs(1.0)}, 3, 0.95),
            out / plots.SR_BY_LENGTH,
        ),
        plots.save(
            plots.task_success({"lift_red": {"success": 3, "total": 4}, "push_blue_left": {"success": 0, "total": 5}}),
            out / plots.TASK_SUCCESS,
        ),
        plots.save(
            plots.action_trajectories(episodes, ["x", "y", "z", "roll", "pitch", "yaw", "gripper open"]),
            out / plots.TRAJECTORIES,
        ),
    ]


def _ink(pixels: np.ndarray) -> float:
    """Fraction of pixels that are not (near) white."""
    return float((pixels[..., :3].min(axis=-1) < 200).mean())


@pytest.mark.slow  # draws every figure twice (5 s): the quick loop stays under 5 minutes
def test_each_figure_draws_and_the_same_numbers_give_the_same_bytes(tmp_path):
    files = _write_all(tmp_path / "a")
    again = _write_all(tmp_path / "b")
    for path, twin in zip(files, again):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 200
            assert 0.01 < _ink(np.asarray(img.convert("RGB"))) < 0.9, path.name
        assert path.read_bytes() == twin.read_bytes(), path.name
    assert oct(files[0].stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dvc_yaml_declares_every_figure_as_an_image_plot():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # each entry is {path: {cache: false}}: the images live in git, so any clone diffs against main's
    entries = {stage: [next(iter(p.items())) for p in stages[stage]["plots"]] for stage in ("train", "evaluate")}
    declared = {stage: [Path(path).name for path, _ in entries[stage]] for stage in entries}
    assert declared == {"train": list(plots.TRAIN_PLOTS), "evaluate": list(plots.EVAL_PLOTS)}
    for stage in ("train", "evaluate"):
        assert all(path.startswith("${paths.reports_dir}/plots/") for path, _ in entries[stage])
        assert all(options == {"cache": False} for _, options in entries[stage])


# --- the pages `dvc plots show` / `dvc plots diff` write, in a real browser ---------------------------------
# The page DVC writes, plus an inline script (no network) that records where each image landed and whether
# it loaded; the screenshot is then checked inside each of those rectangles.
TEMPLATE = """<!DOCTYPE html>
<html><head>{refresh_tag}<title>DVC Plot</title>{scripts}
<style>body { margin: 0; } img { display: block; }</style></head>
<body>{plot_divs}
<pre id="rects"></pre>
<script>
window.addEventListener("load", () => {
  const out = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {src: i.getAttribute("src"), x: r.left, y: r.top, w: r.width, h: r.height, natural: i.naturalWidth};
  });
  document.getElementById("rects").textContent = JSON.stringify(out);
});
</script></body></html>
"""


def _chromium() -> str:
    """Debian's chromium: found, else installed with apt-get (as root), else the test is skipped."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no chromium, and apt-get cannot install it here (not root or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed ({' '.join(cmd)}: {done.stderr.strip()[-200:]})")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


def _browser(chromium: str, page: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1600,4000",
            "--virtual-time-budget=5000",
            *flags,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: chromium under load
    )


def _check_page(chromium: str, page: Path, expected_images: int, tmp_path: Path) -> None:
    dom = _browser(chromium, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-500:]
    rects = json.loads(dom.stdout.split('<pre id="rects">', 1)[1].split("</pre>", 1)[0])
    assert len(rects) == expected_images and all(r["natural"] > 0 for r in rects), rects  # every image loaded
    shot = tmp_path / f"{page.parent.name}.png"
    done = _browser(chromium, page, f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-500:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    for r in rects:  # each plot's own area has drawn content (axes, lines, bars), not a blank box
        x0, y0 = int(r["x"]), int(r["y"])
        area = pixels[y0 : y0 + int(r["h"]), x0 : x0 + int(r["w"])]
        assert area.size and 0.01 < _ink(area) < 0.9, (r["src"], _ink(area) if area.size else None)


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr[-800:]}"


@pytest.mark.slow
def test_dvc_plots_show_and_diff_render_offline_in_chromium(tmp_path):
    chromium = _chromium()
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo)
    _run([*dvc, "init", "-q"], repo)
    _run([*dvc, "config", "core.analytics", "false"], repo)
    files = _write_all(repo / "reports" / "plots")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [str(p.relative_to(repo)) for p in files]}))
    (repo / "page.html").write_text(TEMPLATE)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plots"], repo)
    _run([*dvc, "plots", "show", "--html-template", "page.html", "-o", "show"], repo)
    _check_page(chromium, repo / "show" / "index.html", len(files), tmp_path)
    _write_all(repo / "reports" / "plots", scale=0.5)  # the workspace's figures differ from HEAD's
    _run([*dvc, "plots", "diff", "HEAD", "--html-template", "page.html", "-o", "diff"], repo)
    _check_page(chromium, repo / "diff" / "index.html", 2 * len(files), tmp_path)
    assert "http" not in (repo / "show" / "index.html").read_text().split("<body>", 1)[0]  # nothing from a CDN
