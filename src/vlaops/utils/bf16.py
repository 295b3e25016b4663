"""What this CPU can run in bf16, probed once per process by running it, not by reading CPU flags.

PyTorch's CPU autocast sends ``nn.LSTM`` to oneDNN's bf16 RNN primitive (``mkldnn_rnn_layer``), which
oneDNN implements only for AVX-512 CPUs; on an AVX2 CPU (the AMD EPYC without AVX-512 that found this)
it fails with "could not create a primitive descriptor for the LSTM forward propagation primitive", while
bf16 matmuls and linears still run (emulated). Flags say what the ISA has, not what a given oneDNN
build accepts; a tiny forward and backward in try/except says exactly that, for a few milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn as nn


def _runs(build: Callable[[], tuple[nn.Module, torch.Tensor]]) -> bool:
    """Forward + backward of ``module`` on ``x`` (``build()``) under CPU bf16 autocast, outside any inference mode.

    The global generator is left as it was: the probe first runs inside a training step (the LSTM head's
    first bf16 forward), and drawing its random module there would shift every later dropout mask, so a
    run resumed from a checkpoint (whose process probes at a later step) would not be the uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        module, x = build()
        return _attempt(module, x)


def _attempt(module: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        return True
    except RuntimeError:
        return False


@functools.cache
def cpu_bf16_autocast_works() -> bool:
    """True when a Linear runs forward and backward under CPU bf16 autocast (any CPU PyTorch supports,
    unless the build lacks bf16 kernels altogether)."""
    return _runs(lambda: (nn.Linear(8, 8), torch.randn(2, 8)))


@functools.cache
def cpu_bf16_lstm_works() -> bool:
    """True when an LSTM runs forward and backward under CPU bf16 autocast (oneDNN's bf16 RNN)."""
    return _runs(lambda: (nn.LSTM(8, 8, num_layers=2, batch_first=True), torch.randn(2, 3, 8)))
