"""Regenerate (or check) CALVIN's evaluation data that vlaops keeps: the 1000 chains and the instructions.

    python scripts/calvin_sequences.py --calvin ~/src/calvin            # write both files from CALVIN's own code
    python scripts/calvin_sequences.py --calvin ~/src/calvin --check    # compare instead of writing
    python scripts/calvin_sequences.py --check                          # vlaops' own sampler vs the committed file

``--calvin`` names a mees/calvin checkout. Its ``get_sequences`` (calvin_models/calvin_agent/evaluation/
multistep_sequences.py) is run as it is, in one process; the only thing supplied from here is the
``temp_seed`` helper it imports from ``evaluation/utils.py``, whose other imports (pyhash, torch, the
models) are not needed to sample chains and do not install on Python 3.11. The instructions are the first
annotation of each task in calvin_models/conf/annotations/new_playtable_validation.yaml. Without
``--calvin`` the chains come from ``vlaops.sim.calvin.sequences.sample_sequences``, this project's own
sampler for the same rules (about 40 s).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from vlaops.sim.calvin import sequences
from vlaops.sim.calvin.instructions import INSTRUCTIONS_FILE, instructions_document
from vlaops.utils.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "vlaops" / "sim" / "calvin"
SEQUENCES_MODULE = "calvin_models/calvin_agent/evaluation/multistep_sequences.py"
ANNOTATIONS = "calvin_models/conf/annotations/new_playtable_validation.yaml"
TRAINING_ANNOTATIONS = "calvin_models/conf/annotations/new_playtable.yaml"


@contextlib.contextmanager
def _temp_seed(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for the block, then put back as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def calvin_commit(checkout: Path) -> str:
    """The checkout's commit, for the files' provenance (``--commit`` names it for an exported tree)."""
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown commit"
    return out.stdout.strip() or "unknown commit"


def calvin_sequences(checkout: Path, count: int) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """CALVIN's own ``get_sequences(count)``, run from the checkout in this process."""
    path = checkout / SEQUENCES_MODULE
    if not path.is_file():
        sys.exit(f"{checkout}: no {SEQUENCES_MODULE}; --calvin must name a mees/calvin checkout")
    for name in ("calvin_agent", "calvin_agent.evaluation"):
        sys.modules.setdefault(name, types.ModuleType(name))
    utils = types.ModuleType("calvin_agent.evaluation.utils")
    utils.temp_seed = _temp_seed  # type: ignore[attr-defined]
    sys.modules["calvin_agent.evaluation.utils"] = utils
    name = "calvin_agent.evaluation.multistep_sequences"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # its worker pool pickles its functions by module name
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    pairs = module.get_sequences(count, num_workers=1)
    return [(dict(cond), tuple(str(t) for t in tasks)) for cond, tasks in pairs]


def calvin_instructions(checkout: Path) -> dict[str, str]:
    """{task: its first validation annotation} from the checkout's new_playtable_validation.yaml."""
    data = yaml.safe_load((checkout / ANNOTATIONS).read_text())
    return {task: texts[0] for task, texts in data.items()}


def calvin_training_instructions(checkout: Path) -> dict[str, list[str]]:
    """{task: every training annotation} from the checkout's new_playtable.yaml."""
    data = yaml.safe_load((checkout / TRAINING_ANNOTATIONS).read_text())
    return {task: [str(t) for t in texts] for task, texts in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calvin", type=Path, help="a mees/calvin checkout (default: vlaops' own sampler)")
    parser.add_argument("--commit", help="the checkout's commit, when --calvin is an exported tree, not a git clone")
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--out-dir", type=Path, default=PACKAGE_DIR, help="where the files are (default: the package)")
    args = parser.parse_args()

    documents: dict[str, dict[str, Any]] = {}
    writers: dict[str, Any] = {INSTRUCTIONS_FILE: write_json}
    if args.calvin:
        commit = args.commit or calvin_commit(args.calvin)
        pairs = calvin_sequences(args.calvin, sequences.NUM_SEQUENCES)
        source = f"mees/calvin {commit}, {SEQUENCES_MODULE} get_sequences({sequences.NUM_SEQUENCES})"
        documents[INSTRUCTIONS_FILE] = instructions_document(
            calvin_instructions(args.calvin),
            calvin_training_instructions(args.calvin),
            f"mees/calvin {commit}, {ANNOTATIONS} (instructions: the first annotation per task) and "
            f"{TRAINING_ANNOTATIONS} (training: every annotation)",
        )
    else:
        pairs = sequences.sample_sequences(sequences.NUM_SEQUENCES)
        committed = json.loads((args.out_dir / sequences.SEQUENCES_FILE).read_text())
        source = committed["source"]  # the same chains, so the same provenance
    documents[sequences.SEQUENCES_FILE] = sequences.sequences_document(pairs, source)
    writers[sequences.SEQUENCES_FILE] = lambda path, _doc: sequences.write_sequences(path, pairs, source)

    failed = False
    for name, document in documents.items():
        path = args.out_dir / name
        if args.check:
            committed = json.loads(path.read_text())
            keys = ["sequences"] if name == sequences.SEQUENCES_FILE else ["instructions", "training"]
            same = all(committed.get(key) == document[key] for key in keys)
            entries = ", ".join(f"{len(document[key])} {key}" for key in keys)
            print(f"{path}: {'the same' if same else 'DIFFERENT'} ({entries})")
            failed |= not same
        else:
            writers[name](path, document)
            print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
