"""On a CUDA device the policy trains and acts as it does on the CPU: the same forward, loss and
gradients, the same SGD steps, the same PolicyRuntime actions, and the bf16 loop that ``precision=auto``
picks there runs. Skipped, with the reason, where CUDA is missing (the CPU suite covers the rest)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SyntheticWindows, synthetic_batch

from vlaops.data.normalization import ActionNormalizer
from vlaops.model import ModelConfig, PolicyRuntime, VLAPolicy, save_policy
from vlaops.tracking import TRAIN_LOSS
from vlaops.train.config import TrainConfig, TrainSetupConfig
from vlaops.train.launch import resolve_precision
from vlaops.train.loop import make_loader, train_policy
from vlaops.train.setup import apply_train_setup

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

W, C, L = 3, 4, 12


def make_policy(processor) -> VLAPolicy:
    torch.manual_seed(0)
    cfg = ModelConfig(
        window_size=W,
        fwd_pred_next_n=C,
        max_text_len=L,
        lstm_hidden_size=32,
        lstm_num_layers=2,
        head_mlp_dims=[32],
        pretrained_dir=None,
    )
    policy = VLAPolicy.build(cfg, len(processor.tokenizer))
    apply_train_setup(policy, TrainSetupConfig())
    return policy


@pytest.fixture
def exact_fp32():
    """TF32 off: CUDA's fp32 matmuls and convolutions then agree with the CPU's to float tolerance."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_train_steps_on_cuda_match_cpu(processor, exact_fp32):
    cpu = make_policy(processor).train()
    gpu = copy.deepcopy(cpu).cuda()
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (cpu, gpu)]
    for step in range(3):
        batch = synthetic_batch(processor, 2, W, C, L, seed=step)
        outs = []
        for model, opt, device in zip((cpu, gpu), opts, ("cpu", "cuda")):
            opt.zero_grad(set_to_none=True)
            out = model(_to(batch, device))
            out["loss"].backward()
            outs.append(out)
        (c, g) = outs
        for key in ("loss", "arm_loss", "gripper_loss", "arm", "gripper_logits"):
            torch.testing.assert_close(
                g[key].detach().cpu(), c[key].detach(), rtol=1e-3, atol=1e-4, msg=f"step {step}: {key}"
            )
        for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
            if pc.grad is not None:
                torch.testing.assert_close(
                    pg.grad.cpu(), pc.grad, rtol=1e-3, atol=1e-4, msg=f"step {step}: grad of {name}"
                )
        for opt in opts:
            opt.step()
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(pg.detach().cpu(), pc.detach(), rtol=1e-3, atol=1e-4, msg=f"after 3 steps: {name}")


def test_policy_runtime_on_cuda_matches_cpu(processor, exact_fp32, tmp_path):
    policy = make_policy(processor)
    save_policy(tmp_path / "policy", policy, processor, ActionNormalizer(), policy.cfg)
    cpu, gpu = PolicyRuntime.load(tmp_path / "policy", "cpu"), PolicyRuntime.load(tmp_path / "policy", "cuda")
    assert next(gpu.model.parameters()).is_cuda
    rng = np.random.default_rng(0)
    for t in range(W + 2):  # past a full window: the feature cache rolls over
        obs = {
            "rgb_static": rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
            "rgb_gripper": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8),
        }
        torch.testing.assert_close(
            gpu.encode(obs, "open the drawer").cpu(),
            cpu.encode(obs, "open the drawer"),
            rtol=1e-3,
            atol=1e-4,
            msg=f"frame {t}: features",
        )
        a_cpu, a_gpu = cpu.step(obs, "open the drawer"), gpu.step(obs, "open the drawer")
        np.testing.assert_allclose(a_gpu[:6], a_cpu[:6], atol=1e-4, err_msg=f"frame {t}: arm action")
        assert a_gpu[6] == a_cpu[6], f"frame {t}: gripper"


def test_bf16_training_runs_where_precision_auto_picks_it(processor):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bf16")
    assert resolve_precision("auto") == "bf16"
    data = SyntheticWindows(processor, 4, W, C, L)
    cfg = TrainConfig(
        max_steps=8, batch_size=2, log_every=1, val_every=100, val_batches=1, save_every=0, warmup_ratio=0.0
    )
    rows: list[float] = []
    policy = make_policy(processor)
    result = train_policy(
        policy,
        make_loader(data, cfg, shuffle=False),
        None,
        cfg,
        lambda metrics, step: rows.append(metrics[TRAIN_LOSS]),
        None,
    )
    assert result["steps"] == 8 and len(rows) == 8 and all(np.isfinite(rows))
    assert np.mean(rows[-3:]) < np.mean(rows[:3])  # the same batches again and again: the loss falls
    assert next(policy.parameters()).is_cuda and next(policy.parameters()).dtype == torch.float32  # weights stay fp32
