"""Training cost of the policy: step time, samples/s, peak memory and model FLOPs utilisation (MFU).

One optimiser step of ``VLAPolicy`` (Kosmos-2 + action token + LSTM head) on a synthetic batch of
``train.batch_size`` windows of ``model.window_size`` frames, built and stepped the way the training loop
does it (``build_accelerator`` for the precision, ``apply_train_setup`` for what trains,
``build_optimizer``, and the loop's own ``train_step``: forward, backward, clipping, optimizer step, no
host sync). Recipes (``--modes``): a full fine-tune (the train_setup defaults) and LoRA (``experiment=lora``'s
flags, and with the vision tower and embeddings frozen too). Variants (``--variants``): ``base``, the
step as the loop ran it before (torch's default multi-tensor AdamW, eager layers), ``fused`` (fused AdamW,
the loop's default on CUDA), ``compiled`` (also ``train.compile=true``) and ``bf16`` (``base`` under bf16
autocast: on a CPU with bf16 instructions, is it faster than fp32?), each printed as a ratio against
``base`` of the same run. Random weights: the cost does not depend on them, so the real
1.66 B-parameter Kosmos-2 needs no download (``--size real``).

FLOPs are counted, not estimated: ``torch.utils.flop_counter`` over one eager forward + backward without
activation checkpointing (recomputation is not model work), so MFU = counted FLOPs per step / step time
/ the accelerator's dense bf16 peak. A bf16 8192^3 matrix product measured in the same run is printed
beside it as what this device reaches on plain matrix work. On CUDA, step times come from events around
each of the back-to-back steps (the host waits once, at the end).

    python bench/train_step.py                                          # the tiny default on CPU
    python bench/train_step.py --size real --device cuda                # Kosmos-2 size, batch 4 x window 8, bf16
    python bench/train_step.py --size real --device cuda --modes full --variants base compiled --profile
    python bench/train_step.py --size real --device cpu --steps 1 --warmup 0 --modes lora train.batch_size=1
    python bench/train_step.py --modes full --variants base bf16 --steps 30 # bf16 autocast against fp32 on this CPU

Overrides are Hydra overrides of conf/. Prints a table and writes reports/bench/train_step[_<size>_<device>].json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ingest.py's machine helpers

from ingest import cpu_model  # noqa: E402  (bench/ingest.py)

from vlaops.config import load_config  # noqa: E402
from vlaops.data import keys  # noqa: E402
from vlaops.model import VLAPolicy  # noqa: E402
from vlaops.train.loop import build_accelerator, build_optimizer, train_step  # noqa: E402
from vlaops.train.setup import _set_checkpointing, apply_train_setup, compile_layers  # noqa: E402
from vlaops.utils.atomic import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # what a CPU offers bf16 matrix work (/proc/cpuinfo)


def cpu_bf16_features() -> list[str]:
    """Which of ``BF16_FLAGS`` the CPU reports: an AVX-512 bf16 dot product, AMX tiles (Sapphire Rapids on)."""
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        return []
    return [f for f in BF16_FLAGS if f in flags]


# random weights: what a step costs does not depend on them, and models/pretrained need not exist
RANDOM_WEIGHTS = ["model.pretrained_dir=null"]

# microsoft/kosmos-2-patch14-224's architecture (its config.json) and RoboVLMs' head, as overrides of the
# tiny model so that the same construction path builds it with random weights
REAL_SIZE = [
    "model.tiny.text_embed_dim=2048",
    "model.tiny.text_layers=24",
    "model.tiny.text_attention_heads=32",
    "model.tiny.text_ffn_dim=8192",
    "model.tiny.vision_hidden_size=1024",
    "model.tiny.vision_layers=24",
    "model.tiny.vision_attention_heads=16",
    "model.tiny.vision_intermediate_size=4096",
    "model.tiny.patch_size=14",
    "model.tiny.latent_query_num=64",
    "model.image_size=224",
    "model.lstm_hidden_size=1024",
    "model.lstm_num_layers=4",
    "model.head_mlp_dims=[1024,512,256]",
    "train.batch_size=4",
]
REAL_VOCAB = 65037  # the Kosmos-2 tokenizer (sentencepiece + the grounding tags)

# dense bf16 tensor-core peak (no sparsity) from the vendors' data sheets, by device name
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}

MODES: dict[str, dict[str, Any]] = {
    # train_setup defaults: vision tower, resampler, text decoder, token embeddings, action token, head
    "full": {},
    # experiment=lora as shipped: LoRA on the text decoder; by RoboVLMs' flags the vision tower, resampler
    # and token embeddings still train (train_vision, train_text_embedding default true)
    "lora": {"freeze_backbone": True, "lora_enable": True, "lora_r": 8, "lora_alpha": 16},
    # LoRA with the vision tower and token embeddings frozen: only adapters, resampler, action token, head
    "lora_frozen": {
        "freeze_backbone": True,
        "lora_enable": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "train_vision": False,
        "train_text_embedding": False,
    },
}


# how the step runs: "base" is the loop before fused optimizers and compilation (torch's default
# multi-tensor AdamW, eager layers), the baseline every other variant is a ratio against; "fused" is what
# the loop does on CUDA by default; "compiled" adds train.compile=true; "bf16" is base under bf16 autocast
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"fused": False, "compile": False},
    "fused": {"fused": True, "compile": False},
    "compiled": {"fused": True, "compile": True},
    "bf16": {"fused": False, "compile": False, "precision": "bf16"},
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def synthetic_batch(cfg, vocab_size: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """The training batch contract (vlaops.data.keys) with random content of the configured shapes."""
    g = torch.Generator().manual_seed(seed)
    b, w, c, a, s = (
        cfg.train.batch_size,
        cfg.model.window_size,
        cfg.model.fwd_pred_next_n,
        cfg.model.action_dim,
        cfg.model.image_size,
    )
    length = cfg.model.max_text_len
    text_mask = torch.zeros(b, length, dtype=torch.long)
    text_mask[:, : min(16, length)] = 1  # an instruction of ~16 tokens, padded to max_text_len
    action = torch.rand(b, w, c, a, generator=g) * 2 - 1
    action[..., -1] = (action[..., -1] > 0).float()
    batch = {
        keys.RGB: torch.randn(b, w, 3, s, s, generator=g),
        keys.HAND_RGB: torch.randn(b, w, 3, s, s, generator=g),
        keys.TEXT: torch.randint(3, vocab_size, (b, length), generator=g) * text_mask,
        keys.TEXT_MASK: text_mask,
        keys.ACTION_CHUNK: action,
        keys.CHUNK_MASK: torch.ones(b, w, c, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device) -> float | None:
    """What this device reaches on a plain bf16 8192^3 product (mean of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return None
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        x @ x
    sync(device)
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def bench_mode(
    cfg,
    mode: str,
    variant: str,
    vocab_size: int,
    device: torch.device,
    steps: int,
    warmup: int,
    checkpointing: bool,
    profile: bool = False,
) -> dict[str, Any]:
    """Build the policy for one recipe on ``device``, count its FLOPs, then time ``steps`` optimiser steps
    of ``train_step`` (the loop's own step) as ``variant`` sets the optimizer and compilation."""
    for key, value in MODES[mode].items():
        setattr(cfg.train.train_setup, key, value)
    cfg.train.train_setup.gradient_checkpointing = False  # FLOPs are counted without recomputation
    fused, compiled = VARIANTS[variant]["fused"], VARIANTS[variant]["compile"]
    cfg.train.train_setup.precision = VARIANTS[variant].get("precision", cfg.train.train_setup.precision)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with device:  # random init straight on the device: a 1.6 B model initialised on the CPU takes minutes
        model = VLAPolicy.build(cfg.model, vocab_size=vocab_size)
    counts = apply_train_setup(model, cfg.train.train_setup)
    accelerator = build_accelerator(cfg.train)
    model.train()
    batch = synthetic_batch(cfg, vocab_size, device, cfg.seed)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)  # eager, before any compilation: the model's own operations
    with counter, accelerator.autocast():
        out = model(batch)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if compiled:
        compile_layers(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in params]
    optimizer = build_optimizer(params, cfg.train, fused=fused)
    model, optimizer = accelerator.prepare(model, optimizer)
    if checkpointing:
        _set_checkpointing(accelerator.unwrap_model(model).backbone.model, True)

    def step() -> dict[str, torch.Tensor]:
        return train_step(model, batch, accelerator, optimizer, trainable, cfg.train.gradient_clip_val)  # noqa: F821

    start = time.perf_counter()
    for _ in range(max(warmup, 1)):  # the optimiser state exists from the first step on; compilation happens here
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    if profile:  # where one step's time goes, by operator (self time on the device, else on the CPU)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step()
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- {mode} {variant}: one step by operator", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60), flush=True)
    times = step_times(step, steps, device)
    loss = float(step()["loss"])
    step_s = sorted(times)[len(times) // 2]
    samples = cfg.train.batch_size
    result = {
        "mode": mode,
        "variant": variant,
        "fused_optimizer": fused,
        "compiled_layers": compiled,
        "gradient_checkpointing": checkpointing,
        "params_total": counts["params_total"],
        "params_trainable": counts["params_trainable"],
        "warmup_s": round(warmup_s, 1),
        "step_s_median": round(step_s, 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
        "samples_per_s": round(samples / step_s, 2),
        "frames_per_s": round(samples * cfg.model.window_size / step_s, 1),
        "model_tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step_s / 1e12, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "precision": accelerator.mixed_precision,
        "last_loss": round(loss, 4),
    }
    peak = peak_flops(device)
    result["mfu"] = round(flops / step_s / peak, 4) if peak else None
    del model, optimizer, accelerator, batch, trainable, params
    if compiled:
        torch._dynamo.reset()  # the next variant starts without this one's graphs (and the tensors they hold)
    return result


def step_times(step: Callable[[], Any], steps: int, device: torch.device) -> list[float]:
    """Seconds per step, back to back as the loop runs them. On CUDA each step is bracketed by events and
    the host waits once at the end, so the time includes any gap in which the GPU waits for the host to
    launch work, and no wait of the host that the loop does not have."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        step()
        events[i + 1].record()
    torch.cuda.synchronize(device)
    return [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=["tiny", "real"], default="tiny", help="real: Kosmos-2 1.66 B + RoboVLMs' head, batch 4"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["full", "lora", "lora_frozen"])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=None,
        help="how the step runs (default: base fused compiled on CUDA, base on CPU, the loop's CPU path)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per mode (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="time with Kosmos-2's activation checkpointing on")
    parser.add_argument(
        "--profile", action="store_true", help="print one step's operators by device time (torch.profiler)"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. train.batch_size=8")
    args = parser.parse_args()

    overrides = RANDOM_WEIGHTS + (REAL_SIZE if args.size == "real" else []) + args.overrides
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/train_step.py: --device cuda but torch sees no CUDA device")
    matmul = matmul_tflops(device)  # the baseline of this run: plain matrix work on the same device
    variants = args.variants or (["base", "fused", "compiled"] if device.type == "cuda" else ["base"])
    results = []
    for mode in args.modes:
        for variant in variants:
            cfg = load_config(overrides, ROOT / "conf")
            vocab = REAL_VOCAB if args.size == "real" else cfg.model.vocab_size
            try:
                r = bench_mode(
                    cfg, mode, variant, vocab, device, args.steps, args.warmup, args.checkpointing, args.profile
                )
            except Exception as e:  # noqa: BLE001 - one variant failing (out of memory, a compiler error) is a result too
                print(
                    f"{args.size} {mode} {variant}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    flush=True,
                )
                results.append({"mode": mode, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            r["fraction_of_matmul"] = round(r["achieved_tflops"] / matmul, 3) if matmul else None
            base = next(
                (b for b in results if b["mode"] == mode and b.get("variant") == "base" and "error" not in b), None
            )
            r["speedup_vs_base"] = round(base["step_s_median"] / r["step_s_median"], 3) if base else None
            results.append(r)
            print(
                f"{args.size} {mode:11s} {variant:8s}: {r['step_s_median'] * 1000:9.1f} ms/step "
                f"(x{r['speedup_vs_base'] or '-'} of base)  {r['samples_per_s']:7.2f} samples/s  "
                f"{r['achieved_tflops']:7.2f} TFLOP/s ({r['fraction_of_matmul'] or '-'} of matmul)  "
                f"MFU {r['mfu'] if r['mfu'] is not None else '-'}  "
                f"peak {r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} GiB  "
                f"warm-up {r['warmup_s']} s  trainable {r['params_trainable'] / 1e6:.1f} M of "
                f"{r['params_total'] / 1e6:.1f} M",
                flush=True,
            )
    cfg = load_config(overrides, ROOT / "conf")
    if matmul is not None:
        print(
            f"bf16 8192^3 matmul on this device: {matmul:.0f} TFLOP/s (the data-sheet peak: "
            f"{peak_flops(device) or '-'})"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    report = {
        "benchmark": "train_step",
        "size": args.size,
        "batch_size": cfg.train.batch_size,
        "window_size": cfg.model.window_size,
        "image_size": cfg.model.image_size,
        "use_hand_rgb": cfg.model.use_hand_rgb,
        "results": results,
        "matmul_bf16_tflops": round(matmul, 1) if matmul is not None else None,
        "peak_bf16_flops": peak_flops(device),
        "overrides": overrides,
        "device": name,
        "cpu_bf16_features": cpu_bf16_features(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    out = args.out or ROOT / "reports" / "bench" / (
        "train_step.json"
        if args.size == "tiny" and device.type == "cpu"
        else f"train_step_{args.size}_{device.type}.json"
    )
    write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
