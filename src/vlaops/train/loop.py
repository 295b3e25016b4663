"""The training loop: Accelerate, from one CPU to many GPUs, resumable exactly.

What RoboVLMs' recipe declares and then drops, this loop does: gradient clipping at
``gradient_clip_val`` (``accelerator.clip_grad_norm_``), the optimizer chosen by name, and a cosine that
ends at ``min_lr_scale * learning_rate``. Checkpoints (``vlaops.train.checkpoint``) are atomic, so a
SIGKILL leaves the previous one whole; a restart resumes from the newest one.

Resume is exact (the same weights, bit for bit, as an uninterrupted run on the same machine) because
the data path holds no random state of its own: the sampler's order is a function of (seed, epoch) and
each sample's augmentation a function of (seed, epoch, index) (``vlaops.data.sampling``), so the loader
prefetching a batch before a checkpoint is taken changes nothing; resuming skips to (epoch, position).
The global generators (dropout) are saved with the checkpoint; the loader draws its worker base seed
from a private generator, never from them. Given the source of the frozen weights (``frozen_source``), a
checkpoint holds only the trainable tensors and the resume rebuilds, hash-checks and keeps the frozen rest
(``vlaops.train.trainable``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.data_loader import get_sampler
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, set_seed
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlaops.data.sampling import EpochSampler
from vlaops.errors import VlaopsError
from vlaops.tracking import (
    TRAIN_ARM_LOSS,
    TRAIN_AUX_LOSS,
    TRAIN_GRAD_NORM,
    TRAIN_GRIPPER_LOSS,
    TRAIN_LOSS,
    TRAIN_LR,
    VAL_ARM_LOSS,
    VAL_AUX_LOSS,
    VAL_GRIPPER_LOSS,
    VAL_LOSS,
)
from vlaops.train.checkpoint import (
    TRAINER_STATE_FILE,
    latest_checkpoint,
    read_manifest,
    read_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from vlaops.train.config import TrainConfig
from vlaops.train.ema import WeightEMA
from vlaops.train.launch import check_launch, resolve_precision
from vlaops.train.setup import compile_layers
from vlaops.train.trainable import STORED_TRAINABLE, check_rebuilt, plain_name, trainable_names, weights_record
from vlaops.utils.logging import get_logger

log = get_logger(__name__)

MetricsFn = Callable[[dict[str, float], int], None]
CALLER_STATE = "caller"  # trainer_state.json key of what train_policy's caller asked to keep
MODEL_FILE = "model.safetensors"  # Accelerate's save_state: the (first) model's weights
SHARDING_ENGINES = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # they save their own sharded state


# ---- construction: each from its config keys, in one place -------------------------------------------
def _cpu_launch() -> bool:
    """Without CUDA, Accelerate's ``cpu=True`` is what makes a process join a torchrun / accelerate launch
    (MULTI_CPU, gloo); without it every process would train alone on the same outputs."""
    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in a launch (one process, or one of a torchrun / accelerate launch)."""
    return PartialState(cpu=_cpu_launch())


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The one Accelerator of a run. The loaders carry their own :class:`EpochSampler`, so Accelerate's
    seedable sampler (which replaces only torch's RandomSampler) is not used."""
    mixed = resolve_precision(cfg.train_setup.precision)
    # AcceleratorState is a process-wide singleton that refuses a second, different mixed_precision;
    # forget the previous run's (the distributed PartialState is kept) so one process can train twice
    if AcceleratorState._shared_state and hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=_cpu_launch(),
        # no "generator" sync: our loaders draw nothing from the global generators that needs syncing
        rng_types=[],
    )


def make_loader(dataset: Dataset, cfg: TrainConfig, shuffle: bool, drop_last: bool | None = None) -> DataLoader:
    """A DataLoader with the config's ``batch_size`` and ``num_workers``; training drops the last
    partial batch (steady step time), validation keeps it.

    The dataset is indexed by :class:`vlaops.data.sampling.SampleKey` (an :class:`EpochSampler` seeded by
    ``cfg.seed``); the loader's own generator (it draws the worker base seed at every pass) is private,
    so iterating the loader leaves the global generators, and so dropout after a resume, untouched."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=EpochSampler(len(dataset), cfg.seed, shuffle),
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.num_workers,
        drop_last=shuffle if drop_last is None else drop_last,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def build_optimizer(
    params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """Optimizer by name over the trainable parameters. Weight decay applies to matrices only
    (biases, norms and the action token are exempt), as in nanoGPT's configure_optimizers.

    ``fused`` (the loop sets it on CUDA): Adam/AdamW update every tensor in one kernel pass instead of
    torch's default multi-tensor passes, each of which reads and writes all the weights and their states
    (bench/train_step.py measures both). Off elsewhere, so CPU runs keep the numerics they were measured with."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check train.train_setup")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, fused=fused or None)
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of learning_rate at optimizer step ``s`` (0-based): linear warmup over
    ``warmup_ratio * max_steps`` steps, then cosine down to ``min_lr_scale`` or constant 1."""
    warmup = int(round(cfg.warmup_ratio * cfg.max_steps))
    decay_steps = max(1, cfg.max_steps - warmup)

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / decay_steps)
        return cfg.min_lr_scale + (1.0 - cfg.min_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# ---- the loop -----------------------------------------------------------------------------------------
LOSS_KEYS = ("loss", "arm_loss", "gripper_loss", "aux_loss")


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    trainable: list[nn.Parameter],
    max_norm: float,
) -> dict[str, torch.Tensor]:
    """One forward + backward, and at the end of an accumulation the clip and the optimizer step.

    Returns the losses (and ``grad_norm`` where one was measured) as detached tensors on the device: the
    loop reads them at log steps only, since reading one per step (``.item()``) makes the host wait for
    the device and then leaves the device idle while the next step is launched."""
    with accelerator.accumulate(model):
        out = model(batch)
        accelerator.backward(out["loss"])
        stats = {k: out[k].detach() for k in LOSS_KEYS if k in out}
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
            if grad_norm is not None:  # DeepSpeed clips inside its own step and may report no norm
                stats["grad_norm"] = torch.as_tensor(grad_norm, device=out["loss"].device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


def _mean(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack([v.float() for v in values]).mean() if values else torch.tensor(float("nan"), device=device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Accelerator, max_batches: int) -> dict[str, float]:
    """Mean loss, arm and gripper loss (and aux_loss where the policy has one) over the first
    ``max_batches`` batches of ``loader``."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "arm_loss": 0.0, "gripper_loss": 0.0}
    n = 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        out = model(batch)
        if "aux_loss" in out:
            sums.setdefault("aux_loss", 0.0)
        for k in sums:
            sums[k] += accelerator.gather_for_metrics(out[k].detach().float().reshape(1)).mean().item()
        n += 1
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()} if n else {}


def _epoch_sampler(loader: Any) -> EpochSampler | None:
    """The :class:`EpochSampler` under ``loader``, however Accelerate wrapped it (one process: the loader's
    sampler; several: inside the ``BatchSamplerShard`` around the batch sampler)."""
    candidates = [get_sampler(loader), getattr(loader, "sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None:
        candidates.append(getattr(batch_sampler, "sampler", None))
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return next((c for c in candidates if isinstance(c, EpochSampler)), None)


def _cycle(loader: Any, start_batch: int) -> Iterator[Any]:
    """Endless batches, epoch after epoch, starting ``start_batch`` (per-process) batches into the sequence.

    Epoch e's order and augmentations depend on (seed, e, index) only (:class:`EpochSampler`), so a
    resume starts the sampler ``skip x batch_size x num_processes`` samples into its epoch (every
    process's batches of the skipped steps) and sees exactly what an uninterrupted run would have seen;
    nothing is fetched and thrown away."""
    sampler = _epoch_sampler(loader)
    if sampler is None:
        raise ValueError("the training loader must come from vlaops.train.loop.make_loader (an EpochSampler)")
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the training loader yields no batch (dataset smaller than batch_size with drop_last?)")
    epoch, skip = divmod(start_batch, per_epoch)
    batch_size = loader.total_batch_size if hasattr(loader, "total_batch_size") else loader.batch_size
    while True:
        if hasattr(loader, "set_epoch"):  # Accelerate's loader passes it on to the sampler
            loader.set_epoch(epoch)
        else:
            sampler.set_epoch(epoch)
        if skip:
            sampler.start_at(epoch, skip * batch_size)
        yield from loader
        skip = 0
        epoch += 1


def _load_weights(checkpoint: Path, policy: nn.Module) -> None:
    """The checkpoint's model file into ``policy`` itself (not Accelerate's wrapper: a DDP launch prefixes
    the wrapper's keys with ``module.``, so a non-strict load into it would silently load nothing).

    A trainable-only checkpoint must hold exactly the trainable tensors, and the frozen rest the policy was
    built with must hash as recorded; a whole one must hold every tensor."""
    recorded = read_manifest(checkpoint).get("weights", {})
    if not (checkpoint / MODEL_FILE).is_file():
        raise VlaopsError(f"{checkpoint}: no {MODEL_FILE}; not a checkpoint of this loop")
    with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as handle:
        tensors = {plain_name(k): handle.get_tensor(k) for k in handle.keys()}
    trainable = trainable_names(policy)
    if recorded.get("stored") == STORED_TRAINABLE:  # the frozen part stays as built: check it is the same
        check_rebuilt(checkpoint, recorded, policy, set(tensors), trainable)
    with torch.no_grad():
        missing, unexpected = policy.load_state_dict(tensors, strict=False)
    left_out = set(policy.state_dict()) - trainable if recorded.get("stored") == STORED_TRAINABLE else set()
    if unexpected or set(missing) != left_out:
        raise VlaopsError(
            f"{checkpoint / MODEL_FILE}: does not fit this policy ({len(unexpected)} unexpected tensors, "
            f"e.g. {sorted(unexpected)[:2]}; {len(set(missing) - left_out)} missing, e.g. "
            f"{sorted(set(missing) - left_out)[:2]})"
        )


def train_policy(
    policy: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    cfg: TrainConfig,
    log_metrics: MetricsFn,
    checkpoint_dir: Path | None,
    caller_state: Callable[[], dict[str, Any]] | None = None,
    frozen_source: dict[str, Any] | None = None,
    checkpoint_files: Callable[[Path], None] | None = None,
) -> dict[str, float]:
    """Train ``policy`` (already through ``apply_train_setup``) for ``cfg.max_steps`` optimizer steps.

    ``policy(batch)`` must return a dict with ``loss``, ``arm_loss``, ``gripper_loss``. The policy is
    trained in place; with ``cfg.ema_decay`` it ends holding the moving average of its weights
    (``vlaops.train.ema``), which is also what validation scored. Seed before building the policy for
    reproducible initial weights; this seeds the loop (dropout, sampler). Returns final_train_loss,
    best/last val loss, steps, wall_time_s, steps_per_s, resumed_from_step. ``caller_state()`` (JSON) is saved
    in every checkpoint's trainer state under ``CALLER_STATE`` (the stage keeps its MLflow run id and curve
    there, so a resume continues both). ``frozen_source`` (``vlaops.train.trainable.frozen_source``: how
    ``policy`` was built) makes checkpoints hold the trainable tensors only; without it they hold the whole model.
    ``checkpoint_files(dir)`` writes the caller's files into each checkpoint.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    check_launch(cfg)
    set_seed(cfg.seed)
    accelerator = build_accelerator(cfg)
    engine = accelerator.distributed_type.value if accelerator.distributed_type in SHARDING_ENGINES else None
    if engine is not None and cfg.ema_decay > 0:
        raise VlaopsError(
            f"train.ema_decay={cfg.ema_decay}: the weight average is kept on whole weights, and {engine} shards "
            f"them; set train.ema_decay=0, or train with conf/accelerate/ddp.yaml"
        )
    # before prepare: the digest of the frozen part is taken on the policy as built, unsharded
    weights = weights_record(policy, frozen_source, engine) if checkpoint_dir is not None else None
    if cfg.compile:
        log.info(
            "train.compile: %d Kosmos-2 layers compiled (the first steps, and the first validation, wait for the "
            "compiler)",
            compile_layers(policy),
        )
    params = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, fused=accelerator.device.type == "cuda")
    # not passed through prepare(): Accelerate would step it num_processes times per optimizer step;
    # our schedule is in optimizer steps, whatever the number of processes
    # not registered with accelerator.register_for_checkpointing either: Accelerate pickles custom
    # objects and loads them back with weights_only=False; its state is JSON in trainer_state.json
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if val_loader is not None:
        model, optimizer, train_loader, val_loader = accelerator.prepare(policy, optimizer, train_loader, val_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # after prepare: the average lives where the weights were moved to (Accelerate moves them in place)
    ema = WeightEMA(policy, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def write_files(directory: Path) -> None:
        if checkpoint_files is not None:
            checkpoint_files(directory)
        if ema is not None:
            ema.save(directory)

    if weights is not None and weights["stored"] == STORED_TRAINABLE:

        def trainable_only(
            models: list[nn.Module], state_dicts: list[dict[str, torch.Tensor]], output_dir: str
        ) -> None:
            for i, m in enumerate(models):  # Accelerate saves state_dicts[i] as models[i]'s file
                keep = {plain_name(n) for n in trainable_names(m)}  # wrapped or not, the policy's own names
                state_dicts[i] = {k: v for k, v in state_dicts[i].items() if plain_name(k) in keep}

        accelerator.register_save_state_pre_hook(trainable_only)

    step, best_val, last_val, last_train = 0, float("inf"), float("nan"), float("nan")
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        verify_checkpoint(resume, cfg.trust_checkpoint)
        state = read_trainer_state(resume)
        if "scheduler" not in state:
            raise VlaopsError(
                f"{resume / TRAINER_STATE_FILE}: no scheduler state (a checkpoint of an older vlaops); delete it to "
                "start afresh"
            )
        if engine is None:
            _load_weights(resume, policy)
            # then the optimizer and RNG states (safetensors, and torch.load with weights_only=True); the
            # model file again only where its keys match the prepared model's, which they do not under DDP
            accelerator.load_state(str(resume), strict=False)
        else:  # FSDP / DeepSpeed: their own sharded states, through Accelerate
            accelerator.load_state(str(resume))
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load(resume)
        step = int(state["step"])
        best_val = float(state.get("best_val_loss", best_val))
        last_val = float(state.get("last_val_loss", last_val))
        last_train = float(state.get("last_train_loss", last_train))
        log.info("resumed from %s at step %d", resume, step)
    resumed_from = step
    log.info(
        "training %d steps (batch %d x %d process(es), accumulation %d, %s, precision %s, %s lr %.2g)",
        cfg.max_steps,
        cfg.batch_size,
        accelerator.num_processes,
        cfg.gradient_accumulation_steps,
        accelerator.device,
        accelerator.mixed_precision,
        cfg.optimizer,
        cfg.learning_rate,
    )

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "max_steps": cfg.max_steps,
            "best_val_loss": best_val,
            "last_val_loss": last_val,
            "last_train_loss": last_train,
            "scheduler": scheduler.state_dict(),
            CALLER_STATE: caller_state() if caller_state is not None else {},
        }

    def validate() -> None:
        nonlocal best_val, last_val
        if val_loader is None or cfg.val_batches == 0:
            return
        with ema.applied() if ema is not None else contextlib.nullcontext():  # validate what will be exported
            val = evaluate(model, val_loader, accelerator, cfg.val_batches)
        if not val:
            return
        last_val = val["loss"]
        best_val = min(best_val, last_val)
        if accelerator.is_main_process:
            metrics = {VAL_LOSS: val["loss"], VAL_ARM_LOSS: val["arm_loss"], VAL_GRIPPER_LOSS: val["gripper_loss"]}
            if "aux_loss" in val:
                metrics[VAL_AUX_LOSS] = val["aux_loss"]
            log_metrics(metrics, step)

    model.train()
    batches = _cycle(train_loader, start_batch=step * cfg.gradient_accumulation_steps)
    window: dict[str, list[torch.Tensor]] = {k: [] for k in (*LOSS_KEYS, "grad_norm")}
    # max_norm inf measures the norm without clipping when clipping is off
    max_norm = cfg.gradient_clip_val if cfg.gradient_clip_val > 0 else float("inf")
    start = time.perf_counter()
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc="train",
        disable=None if accelerator.is_main_process else True,
        dynamic_ncols=True,
    )
    while step < cfg.max_steps:
        for k, value in train_step(model, next(batches), accelerator, optimizer, trainable, max_norm).items():
            window[k].append(value)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update(step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # every process's mean over the window, averaged across processes (one collective per log step)
            means = torch.stack(
                [
                    _mean(window[k], accelerator.device)
                    for k in ("loss", "arm_loss", "gripper_loss", "grad_norm", "aux_loss")
                ]
            )
            loss, arm_loss, gripper_loss, grad, aux_loss = accelerator.reduce(means, reduction="mean").tolist()
            last_train = loss
            metrics = {
                TRAIN_LOSS: loss,
                TRAIN_ARM_LOSS: arm_loss,
                TRAIN_GRIPPER_LOSS: gripper_loss,
                TRAIN_GRAD_NORM: grad,
                TRAIN_LR: scheduler.get_last_lr()[0],
            }
            if window["aux_loss"]:
                metrics[TRAIN_AUX_LOSS] = aux_loss
            bar.set_postfix(loss=f"{last_train:.4f}")
            if bar.disable and accelerator.is_main_process:  # no terminal (CI, a log file): one line instead
                log.info("step %d/%d: loss %.4f, lr %.3g", step, cfg.max_steps, last_train, metrics[TRAIN_LR])
            if accelerator.is_main_process:
                log_metrics(metrics, step)
            window = {k: [] for k in window}
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            validate()
        if checkpoint_dir is not None and cfg.save_every > 0 and (step % cfg.save_every == 0 or step == cfg.max_steps):
            save_checkpoint(
                accelerator, checkpoint_dir, step, trainer_state(), cfg.keep_checkpoints, weights, write_files
            )
    bar.close()
    wall = time.perf_counter() - start
    if ema is not None:  # the caller saves the policy it passed in: the average, as validated
        ema.copy_to_params()
        log.info("the policy holds the moving average of its weights (train.ema_decay=%g)", cfg.ema_decay)
    done = step - resumed_from
    # drop Accelerate's autocast wrapper from the caller's module: later inference runs as built
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.wait_for_everyone()
    result = {
        "final_train_loss": last_train,
        "best_val_loss": best_val if math.isfinite(best_val) else float("nan"),
        "last_val_loss": last_val,
        "steps": float(step),
        "resumed_from_step": float(resumed_from),
        "wall_time_s": wall,
        "steps_per_s": done / wall if wall > 0 and done else 0.0,
    }
    log.info("training done: %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return result
