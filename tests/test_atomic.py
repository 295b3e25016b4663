"""utils/atomic.py: outputs appear whole or not at all, with the user's permissions; temporaries of a
killed writer are swept by the next write, those of a live writer are not."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vlaops.utils.atomic import atomic_dir, atomic_file, sweep_stale_temps, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_umask_permissions_not_the_temporaries(tmp_path, umask, mask):
    umask(mask)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        write_json(tmp / "b.json", {"b": 1})
    with atomic_file(tmp_path / "c.txt") as handle:
        handle.write("c")
    plain_dir, plain_file = tmp_path / "plain", tmp_path / "plain.txt"
    plain_dir.mkdir()
    plain_file.write_text("p")
    assert _mode(tmp_path / "out") == _mode(plain_dir) == 0o777 & ~mask
    assert _mode(tmp_path / "c.txt") == _mode(tmp_path / "out" / "b.json") == _mode(plain_file) == 0o666 & ~mask


HOLDER = """
import sys, time
from vlaops.utils.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(target: Path, seconds: float) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    return proc, Path(proc.stdout.readline().strip())


def test_a_live_writers_temporary_is_kept_a_dead_ones_is_swept(tmp_path, caplog):
    target = tmp_path / "out"
    # both hold their temporary until killed (an hour: no load makes the test outlast it)
    live, live_tmp = _holder(target, 3600)
    dead, dead_tmp = _holder(target, 3600)
    try:
        dead.kill()
        dead.wait()
        assert live_tmp.is_dir() and dead_tmp.is_dir()
        other = tmp_path / ".outer.tmp-x"  # another output's temporary: not ours to touch
        other.mkdir()
        assert sweep_stale_temps(target) == [dead_tmp]
        assert live_tmp.is_dir() and not dead_tmp.exists() and other.is_dir()
        assert f"removed {dead_tmp}" in caplog.text
    finally:
        live.kill()
        live.wait()
    with atomic_file(tmp_path / "f.txt") as handle:  # a file's stale temporary (mkstemp leftovers) too
        handle.write("x")
    (tmp_path / ".f.txt.tmp-abc").write_text("half")
    write_json(tmp_path / "f.txt", {"ok": True})
    assert sorted(p.name for p in tmp_path.glob("*f.txt*")) == ["f.txt"]


def test_a_failing_block_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "v").read_text() == "1"
