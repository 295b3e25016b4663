"""``vlaops <stage> [hydra overrides]``: run one pipeline stage, from the shell or from ``dvc repro``.

From the shell, the config is composed from ``conf/`` with Hydra overrides::

    vlaops train train.max_steps=50 model.lstm_hidden_size=256

From ``dvc.yaml`` it is read from the composed ``params.yaml`` (``--params params.yaml``), the
file DVC tracks and ``dvc exp run -S`` rewrites. Either way the same stage function runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from vlaops.config import DEFAULT_CONFIG_DIR, Config, compose, dump_params, load_config, load_params, to_container
from vlaops.errors import Terminated, VlaopsError
from vlaops.utils.atomic import atomic_file
from vlaops.utils.logging import get_logger
from vlaops.utils.signals import signal_arrived, signal_behind

log = get_logger(__name__)
STAGES = ("pretrain", "collect", "ingest", "convert", "normalize", "train", "evaluate")
ACCELERATE_CONFIGS = "accelerate"  # conf/accelerate/: files for `accelerate launch --config_file`, not a Hydra group


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_groups(config_dir: str | os.PathLike[str]) -> str:
    """The config groups of ``config_dir`` and their options, for ``--help`` (Hydra's own help lists them)."""
    root = Path(config_dir)
    if not root.is_dir():
        return f"(no config directory {root}: run from the project root or pass --config-dir)"
    lines = ["config groups (override one with group=option, e.g. experiment=cpu_long):"]
    for group in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options and group.name != ACCELERATE_CONFIGS:
            lines.append(f"  {group.name}: {', '.join(options)}")
    lines.append("any key of the composed config: key=value (see 'vlaops <command> --cfg job')")
    if (root / ACCELERATE_CONFIGS).is_dir():
        lines.append(
            f"launch configs (accelerate launch --config_file {root.name}/{ACCELERATE_CONFIGS}/<name>.yaml -m "
            "vlaops.cli train ...): " + ", ".join(sorted(f.stem for f in (root / ACCELERATE_CONFIGS).glob("*.yaml")))
        )
    return "\n".join(lines)


def _parser(config_dir: str | os.PathLike[str] = DEFAULT_CONFIG_DIR) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlaops",
        description="Robot recordings -> CALVIN -> a fine-tuned Kosmos-2 + LSTM policy. "
        "Each command is one DVC stage; trailing key=value arguments are Hydra overrides.",
        epilog=_config_groups(config_dir),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        choices=[*STAGES, "params", "check", "inspect", "serve", "export"],
        help="a pipeline stage; 'params' to write params.yaml from conf/; 'check' to check every "
        "stage's output paths and the tracking store in seconds, before a long run; 'serve' to "
        "serve the policy in paths.model_dir over HTTP (serve.host, serve.port; not a stage); "
        "'export CHECKPOINT_DIR OUT' to write the policy directory of a training checkpoint "
        "(trainable-only, or an FSDP sharded state; LoRA merged; not a stage)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.max_steps=50 model=kosmos2")
    parser.add_argument(
        "--params", metavar="FILE", help="read the composed config from FILE (what dvc.yaml does) instead of conf/"
    )
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, help="Hydra config directory (default: ./conf)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="with 'params': fail if params.yaml differs from conf/ instead of writing it",
    )
    parser.add_argument(
        "--cfg",
        choices=["job"],
        help="print the composed config the command would run with (YAML) and exit, as Hydra's --cfg job",
    )
    parser.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="a sweep (Hydra's multirun; 'train' only): one job per setting of sweep overrides (a=1,2 range() "
        "choice() glob()) or an Optuna search (hparams_search=train_lr), each job in hydra.sweep.dir/N "
        "and an MLflow run nested under the sweep's, which keeps the best (src/vlaops/sweep.py)",
    )
    inspect = parser.add_argument_group(
        "inspect PATH (not a stage)",
        "what to check before spending GPU hours: 'vlaops inspect PATH [key=value ...]' summarises a directory of\n"
        "recordings (read as ingest reads them, with the data.* settings), canonical episodes or a CALVIN split:\n"
        "episodes, frames, tasks, instruction counts, action ranges per dimension, image sizes, control rate,\n"
        "and the recordings that cannot be read, with the reason",
    )
    inspect.add_argument(
        "--sheet",
        metavar="PNG",
        help="draw a contact sheet there: first / middle / last frame of a few episodes, per camera",
    )
    inspect.add_argument(
        "--episodes", metavar="N", type=int, default=6, help="episodes on the contact sheet (default: 6)"
    )
    inspect.add_argument("--json", metavar="FILE", help="also write the summary to FILE as JSON")
    return parser


def _write_params(args: argparse.Namespace) -> None:
    raw = compose(args.overrides, args.config_dir)
    text = dump_params(raw)
    target = Path(args.params or "params.yaml")
    if args.check:
        current = yaml.safe_load(target.read_text()) if target.is_file() else None
        if current != yaml.safe_load(text):
            raise VlaopsError(
                f"{target}: differs from the composition of {args.config_dir}/; run 'vlaops params' to rewrite it"
            )
        log.info("%s matches %s/", target, args.config_dir)
        return
    with atomic_file(target) as handle:
        handle.write(text)
    log.info("wrote %s", target)


def run_stage(name: str, cfg: Config) -> None:
    """Import and run ``vlaops.stages.<name>.run(cfg)``; imports stay lazy so ``--help`` is instant."""
    module = importlib.import_module(f"vlaops.stages.{name}")
    seed_everything(cfg.seed)
    started = time.perf_counter()
    module.run(cfg)
    log.info("%s finished in %.1fs", name, time.perf_counter() - started)


def check_all(cfg: Config) -> None:
    """What every stage checks in its first second, for the whole pipeline at once: the config (already
    validated by loading it), every output path writable, the tracking store usable, the executor's
    cluster reachable (``compute.executor=ray``)."""
    from vlaops.tracking import check_store
    from vlaops.utils.executor import connect
    from vlaops.utils.paths import check_outputs

    keys = sorted({key for stage in STAGES for key in check_outputs(cfg, stage)})
    check_store(cfg.tracking)
    connect(cfg.compute)
    log.info(
        "config valid; %d output paths writable (%s); tracking store usable; executor %s",
        len(keys),
        ", ".join(keys),
        cfg.compute.executor,
    )


def _inspect_path(args: argparse.Namespace) -> str:
    """``vlaops inspect PATH key=value ...``: PATH is the one argument that is not a Hydra override; it is
    taken out of ``args.overrides`` so the rest compose the config."""
    paths = [a for a in args.overrides if "=" not in a or Path(a).exists()]
    if len(paths) != 1:
        raise VlaopsError(
            f"expected one PATH (a directory of recordings, episodes or a CALVIN split), got {paths or 'none'}"
        )
    args.overrides.remove(paths[0])
    return paths[0]


def _export_paths(args: argparse.Namespace) -> tuple[str, str]:
    """``vlaops export CHECKPOINT_DIR OUT [key=value ...]``: the two arguments that are not Hydra overrides."""
    paths = [a for a in args.overrides if "=" not in a]
    if len(paths) != 2:
        raise VlaopsError(
            "expected CHECKPOINT_DIR and OUT (a step_XXXXXXX or paths.checkpoint_dir, and the policy directory to "
            f"write), got {paths or 'none'}"
        )
    for p in paths:
        args.overrides.remove(p)
    return paths[0], paths[1]


def inspect_data(path: str, cfg: Config, args: argparse.Namespace) -> None:
    """Print the summary of ``path`` (``vlaops.data.inspect``), write ``--sheet`` and ``--json``; a dataset
    of which no episode can be read is an error, after the table has said why."""
    from vlaops.data.inspect import inspect_path, summary_table
    from vlaops.utils.atomic import write_json

    summary = inspect_path(Path(path), cfg.data, sheet=args.sheet, sheet_episodes=args.episodes)
    print(summary_table(summary))
    if args.json:
        write_json(args.json, summary)
        log.info("wrote %s", args.json)
    if not summary["episodes"]:
        raise VlaopsError(f"{path}: no episode could be read ({len(summary['unreadable'])} unreadable, listed above)")


def _raise_signalled(signum: int, frame: object) -> None:
    signal_arrived(signum)


def _quiet_swallowed_signal(unraisable: sys.UnraisableHookArgs) -> None:
    """Python prints an exception raised where it cannot propagate (a C callback, ``__del__``) as
    "Exception ignored ... Traceback"; for our Terminated that is the signal, which the work loops honour
    at their next item (``utils.signals.raise_if_signalled``): no traceback for the user."""
    if isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
        return
    sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the epilog lists the groups of the config dir this call will use
    config_dir = argv[argv.index("--config-dir") + 1] if "--config-dir" in argv[:-1] else DEFAULT_CONFIG_DIR
    args = _parser(config_dir).parse_intermixed_args(argv)
    # SIGTERM unwinds like Ctrl-C (an exception), so atomic outputs drop their temporaries and the
    # MLflow run is closed as KILLED; Python's default would end the process on the spot, like kill -9.
    # Both handlers also remember the signal, which a library's cleanup may hide under an error of its own.
    handle = threading.current_thread() is threading.main_thread()  # Python allows handlers only there
    previous = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGTERM, signal.SIGINT)} if handle else {}
    sys.unraisablehook = _quiet_swallowed_signal
    try:
        if args.command == "params":
            _write_params(args)
            return 0
        if args.multirun:
            if args.params or args.cfg:
                raise VlaopsError("-m composes each job from conf/ and runs it; it takes neither --params nor --cfg")
            from vlaops.sweep import run_sweep

            run_sweep(args.command, args.overrides, args.config_dir, run_stage)
            return 0
        path = _inspect_path(args) if args.command == "inspect" else None
        export_paths = _export_paths(args) if args.command == "export" else None
        cfg = load_params(args.params, args.overrides) if args.params else load_config(args.overrides, args.config_dir)
        if args.cfg == "job":
            print(yaml.safe_dump(to_container(cfg), sort_keys=False), end="")
            return 0
        if args.command == "check":
            check_all(cfg)
            return 0
        if path is not None:
            inspect_data(path, cfg, args)
            return 0
        if export_paths is not None:
            from vlaops.train.export import export_checkpoint

            export_checkpoint(Path(export_paths[0]), Path(export_paths[1]), cfg.train.trust_checkpoint)
            return 0
        if args.command == "serve":
            from vlaops.serve.app import serve

            serve(cfg.paths.model_dir, cfg.serve)
            return 0
        run_stage(args.command, cfg)
    except BaseException as exc:
        signum = signal_behind(exc)
        if signum is not None:
            name = signal.Signals(signum).name
            print(
                f"vlaops {args.command}: stopped by {name}; no partial outputs were kept, the MLflow run (if any) is "
                "KILLED",
                file=sys.stderr,
            )
            return 128 + signum
        if isinstance(exc, VlaopsError):
            print(f"vlaops {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
