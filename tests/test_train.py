"""The Accelerate training loop on a tiny random policy: the loss falls, every config key acts, resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import INSTRUCTIONS, SyntheticWindows

from vlaops.data import keys
from vlaops.errors import VlaopsError
from vlaops.model import ModelConfig, VLAPolicy
from vlaops.tracking import TRAIN_GRAD_NORM, TRAIN_LOSS, TRAIN_LR, VAL_LOSS
from vlaops.train.checkpoint import latest_checkpoint
from vlaops.train.config import TrainConfig, TrainSetupConfig
from vlaops.train.launch import resolve_precision
from vlaops.train.loop import build_optimizer, evaluate, lr_lambda, make_loader, train_policy
from vlaops.train.setup import apply_train_setup
from vlaops.utils.bf16 import cpu_bf16_autocast_works, cpu_bf16_lstm_works

W, C, A, L, S = 2, 3, 7, 12, 224


def windows(processor, n: int, seed: int = 0) -> SyntheticWindows:
    return SyntheticWindows(processor, n, W, C, L, seed, S)


def make_policy(processor, seed: int = 0) -> VLAPolicy:
    torch.manual_seed(seed)
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


class Recorder:
    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.rows if name in m]


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=4, batch_size=2, log_every=1, val_every=100, val_batches=1, save_every=0, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_on_a_fixed_batch(processor):
    policy = make_policy(processor)
    data = windows(processor, 2)
    rec = Recorder()
    c = cfg(max_steps=20, val_every=20)
    result = train_policy(
        policy, make_loader(data, c, shuffle=False), make_loader(data, c, shuffle=False), c, rec, None
    )
    losses = [v for _, v in rec.series(TRAIN_LOSS)]
    assert len(losses) == 20 and [s for s, _ in rec.series(TRAIN_LOSS)] == list(range(1, 21))
    # the default lr (1e-3) on random targets: a steady fall, ~10% in 20 steps (3e-3 gives ~35%)
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    assert all(b <= a + 1e-4 for a, b in zip(losses, losses[1:])), losses
    assert result["steps"] == 20 and result["final_train_loss"] == losses[-1]
    assert math.isfinite(result["best_val_loss"]) and result["best_val_loss"] == result["last_val_loss"]
    assert result["steps_per_s"] > 0
    # cosine with min_lr_scale: the last logged lr is min_lr_scale * lr (warmup 0, 20 steps)
    lrs = [v for _, v in rec.series(TRAIN_LR)]
    assert lrs[0] == pytest.approx(c.learning_rate, rel=0.05)
    assert lrs[-1] == pytest.approx(c.learning_rate * c.min_lr_scale, rel=1e-6)


def test_gradient_clipping_is_applied(processor):
    """SGD without momentum moves parameters by lr x clipped gradient: its norm is at most lr x clip."""
    policy = make_policy(processor)
    before = torch.cat([p.detach().flatten().clone() for p in policy.parameters() if p.requires_grad])
    data = windows(processor, 2)
    c = cfg(
        max_steps=1, optimizer="sgd", momentum=0.0, learning_rate=1.0, gradient_clip_val=1e-3, lr_scheduler="constant"
    )
    rec = Recorder()
    train_policy(policy, make_loader(data, c, shuffle=False), None, c, rec, None)
    after = torch.cat([p.detach().flatten() for p in policy.parameters() if p.requires_grad])
    assert rec.series(TRAIN_GRAD_NORM)[0][1] > 1e-2  # the raw norm is far above the clip ...
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3)  # ... and the update is clipped


def test_resume_continues_at_the_right_step(processor, tmp_path):
    """6 steps == 4 steps, then a fresh process resuming to 6 (shuffled data, 3 batches an epoch, so the
    resume lands inside the second epoch)."""
    data = windows(processor, 6)
    c = cfg(max_steps=6, save_every=4, lr_scheduler="constant")
    full = make_policy(processor)
    train_policy(full, make_loader(data, c, shuffle=True), None, c, Recorder(), tmp_path / "full")
    assert latest_checkpoint(tmp_path / "full").name == "step_0000006"
    init = make_policy(processor).state_dict()
    assert not all(torch.equal(init[k], v) for k, v in full.state_dict().items())  # it did train

    first_cfg = cfg(max_steps=4, save_every=4, lr_scheduler="constant")
    train_policy(
        make_policy(processor),
        make_loader(data, first_cfg, shuffle=True),
        None,
        first_cfg,
        Recorder(),
        tmp_path / "run",
    )
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    (tmp_path / "run" / ".step_0000005.tmp").mkdir()  # a save killed midway is ignored

    resumed = make_policy(processor, seed=123)  # different init: the checkpoint must overwrite it
    rec = Recorder()
    result = train_policy(resumed, make_loader(data, c, shuffle=True), None, c, rec, tmp_path / "run")
    assert result["resumed_from_step"] == 4 and result["steps"] == 6
    assert [s for s, _ in rec.series(TRAIN_LOSS)] == [5, 6]
    for (name, p_full), (_, p_res) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p_res, p_full), name  # exact: the same bits as the uninterrupted run
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "step_0000004",
        "step_0000006",
    ]

    # a finished run resumes to nothing
    again = train_policy(
        make_policy(processor), make_loader(data, c, shuffle=True), None, c, Recorder(), tmp_path / "run"
    )
    assert again["steps"] == 6 and again["resumed_from_step"] == 6


def test_keep_checkpoints_prunes_old_ones(processor, tmp_path):
    data = windows(processor, 2)
    c = cfg(max_steps=3, save_every=1, keep_checkpoints=2)
    train_policy(make_policy(processor), make_loader(data, c, shuffle=False), None, c, Recorder(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]


def test_validation_is_logged(processor):
    data = windows(processor, 4)
    c = cfg(max_steps=2, val_every=1, val_batches=1)
    rec = Recorder()
    train_policy(
        make_policy(processor), make_loader(data, c, shuffle=False), make_loader(data, c, shuffle=False), c, rec, None
    )
    assert [s for s, _ in rec.series(VAL_LOSS)] == [1, 2]


def test_lr_schedule_warmup_cosine_constant():
    c = TrainConfig(max_steps=100, warmup_ratio=0.1, min_lr_scale=0.01)
    f = lr_lambda(c)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert f(1000) == pytest.approx(0.01)
    g = lr_lambda(TrainConfig(max_steps=100, warmup_ratio=0.0, lr_scheduler="constant"))
    assert g(0) == g(99) == 1.0


@pytest.mark.parametrize(
    "name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizer_by_name_with_weight_decay_on_matrices(name, cls):
    lin = torch.nn.Linear(3, 2)
    opt = build_optimizer(list(lin.named_parameters()), TrainConfig(optimizer=name, weight_decay=0.1))
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["params"][0] is lin.weight


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_fused_optimizer_steps_like_the_multi_tensor_one(name):
    """fused=True (the loop's choice on CUDA) is the same update in one kernel pass: on the CPU, where torch
    has a fused Adam too, a few steps of each from the same weights and gradients agree."""
    torch.manual_seed(0)
    lin = {fused: torch.nn.Linear(16, 8) for fused in (False, True)}
    lin[True].load_state_dict(lin[False].state_dict())
    c = TrainConfig(optimizer=name, weight_decay=0.1)
    try:
        opts = {fused: build_optimizer(list(lin[fused].named_parameters()), c, fused=fused) for fused in (False, True)}
        assert opts[True].defaults["fused"] is True and not opts[False].defaults["fused"]
        x = torch.randn(4, 16)
        for _ in range(3):
            for fused in (False, True):
                lin[fused](x).square().sum().backward()
                opts[fused].step()
                opts[fused].zero_grad()
    except RuntimeError as e:  # a torch without the CPU kernel
        pytest.skip(f"this torch has no fused {name} on the CPU: {e}")
    for a, b in zip(lin[False].parameters(), lin[True].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_precision_resolution():
    assert resolve_precision("fp32") == "no"
    if torch.cuda.is_available() or cpu_bf16_autocast_works():
        assert resolve_precision("bf16") == "bf16"
    else:
        with pytest.raises(VlaopsError, match="precision=bf16: this CPU"):
            resolve_precision("bf16")
    if torch.cuda.is_available():
        assert resolve_precision("fp16") == "fp16"
    else:
        with pytest.raises(VlaopsError, match="fp16"):
            resolve_precision("fp16")
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_precision("auto") == expected


def test_lstm_head_under_cpu_bf16_autocast():
    """Where oneDNN has no bf16 LSTM (an AVX2-only CPU), the LSTM alone runs in fp32 and the MLP heads
    stay in bf16; either way forward and backward work."""
    if not cpu_bf16_autocast_works():
        pytest.skip("this CPU runs no bf16 autocast at all (a tiny bf16 Linear fails)")
    from vlaops.model.head import LSTMPolicyHead

    torch.manual_seed(0)
    head = LSTMPolicyHead(16, action_dim=A, fwd_pred_next_n=C, hidden_size=8, num_layers=2, mlp_dims=[8])
    seen = []
    head.rnn.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    features = torch.randn(2, W, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        arm, gripper = head(features)
    (arm.float().sum() + gripper.float().sum()).backward()
    if not cpu_bf16_lstm_works():
        assert seen == [torch.float32]  # the fallback: fp32 LSTM inside the bf16 step
    assert arm.dtype == gripper.dtype == torch.bfloat16  # the heads stay in bf16
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    with torch.no_grad():  # fp32 outside autocast, as built
        assert head(features)[0].dtype == torch.float32


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"optimizer": "lion"}, "optimizer"),
        ({"lr_scheduler": "step"}, "lr_scheduler"),
        ({"max_steps": 0}, "max_steps"),
        ({"min_lr_scale": 2.0}, "min_lr_scale"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"compile": "yes"}, "compile"),
    ],
)
def test_train_config_names_bad_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)


def test_make_loader_reads_batch_size_and_workers(processor):
    data = windows(processor, 5)
    c = cfg(batch_size=2, num_workers=0)
    loader = make_loader(data, c, shuffle=True)
    assert loader.batch_size == 2 and loader.num_workers == 0 and len(loader) == 2  # drop_last for training
    batch = next(iter(make_loader(data, c, shuffle=False)))
    assert batch[keys.RGB].shape == (2, W, 3, S, S) and batch[keys.RAW_TEXT] == INSTRUCTIONS[:2]


def test_bf16_then_fp32_in_one_process(processor):
    """precision acts (bf16 autocast, on CPU here) and a second run may change it."""
    if not torch.cuda.is_available() and not cpu_bf16_autocast_works():
        pytest.skip(
            "this CPU runs no bf16 autocast at all (a tiny bf16 Linear fails): precision=bf16 stops with one line"
        )
    data = windows(processor, 2)
    for precision in ("bf16", "fp32"):
        c = cfg(max_steps=2, train_setup=TrainSetupConfig(precision=precision))
        policy = make_policy(processor)
        rec = Recorder()
        train_policy(policy, make_loader(data, c, shuffle=False), None, c, rec, None)
        assert all(math.isfinite(v) for _, v in rec.series(TRAIN_LOSS))
        assert all(p.dtype == torch.float32 for p in policy.parameters())  # master weights stay fp32
        out = policy(next(iter(make_loader(data, c, shuffle=False))))  # the autocast wrapper is gone
        assert out["arm"].dtype == torch.float32


def test_only_checkpoints_vlaops_wrote_are_resumed(processor, tmp_path, caplog):
    """A checkpoint carries vlaops' manifest (sha256 of every file); one without it, or altered since, is
    refused with one line unless train.trust_checkpoint. Nothing is saved for a pickle load: the
    scheduler state is JSON in trainer_state.json, not Accelerate's custom_checkpoint_0.pkl."""
    import json
    import shutil

    from vlaops.train.checkpoint import MANIFEST_FILE

    data = windows(processor, 2)
    c = cfg(max_steps=2, save_every=2)
    train_policy(make_policy(processor), make_loader(data, c, shuffle=False), None, c, Recorder(), tmp_path / "ok")
    ckpt = tmp_path / "ok" / "step_0000002"
    assert {p.name for p in ckpt.glob("*.pkl")} == {"random_states_0.pkl"}  # loaded with weights_only=True
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())["sha256"]
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(manifest)
    longer = cfg(max_steps=3, save_every=2)

    def resume(name: str, conf: TrainConfig) -> dict:
        return train_policy(
            make_policy(processor), make_loader(data, conf, shuffle=False), None, conf, Recorder(), tmp_path / name
        )

    foreign = tmp_path / "foreign" / "step_0000002"
    shutil.copytree(ckpt, foreign)
    (foreign / MANIFEST_FILE).unlink()
    with pytest.raises(
        VlaopsError, match=r"foreign/step_0000002: no vlaops_manifest.json.*train.trust_checkpoint=true"
    ):
        resume("foreign", longer)
    altered = tmp_path / "altered" / "step_0000002"
    shutil.copytree(ckpt, altered)
    with (altered / "optimizer.bin").open("ab") as handle:
        handle.write(b"\0")
    (altered / "custom_checkpoint_0.pkl").write_bytes(b"not ours")
    with pytest.raises(
        VlaopsError,
        match=r"differs from its manifest \(changed \['optimizer.bin'\].*unlisted \['custom_checkpoint_0.pkl'\]",
    ):
        resume("altered", longer)
    trusted = cfg(max_steps=3, save_every=2, trust_checkpoint=True)
    assert resume("foreign", trusted)["resumed_from_step"] == 2  # the user vouches for it
    assert "loading it because train.trust_checkpoint=true" in caplog.text
    assert resume("ok", longer)["resumed_from_step"] == 2


def test_ema_decay_trains_validates_and_returns_the_moving_average(processor, tmp_path):
    """With train.ema_decay the policy handed back is the average of the per-step weights (the same run
    without it, checkpointed every step, gives them), its validation loss is that of the average, and the
    averaged weights are in each checkpoint."""
    from safetensors.torch import load_file

    from vlaops.train.ema import EMA_FILE, decay_at

    data = windows(processor, 4)
    plain = cfg(max_steps=4, save_every=1, keep_checkpoints=4, lr_scheduler="constant")
    train_policy(
        make_policy(processor), make_loader(data, plain, shuffle=True), None, plain, Recorder(), tmp_path / "plain"
    )
    names = [n for n, p in make_policy(processor).named_parameters() if p.requires_grad]
    expected = {n: p.detach().clone() for n, p in make_policy(processor).named_parameters() if p.requires_grad}
    for step in range(1, 5):
        weights = load_file(str(tmp_path / "plain" / f"step_{step:07d}" / "model.safetensors"))
        d = decay_at(0.5, step)
        expected = {n: d * expected[n] + (1 - d) * weights[n] for n in names}
    assert decay_at(0.5, 1) == pytest.approx(2 / 11) and decay_at(0.5, 100) == 0.5  # short at first

    averaged = make_policy(processor)
    c = cfg(max_steps=4, save_every=4, lr_scheduler="constant", ema_decay=0.5, val_every=4)
    result = train_policy(
        averaged,
        make_loader(data, c, shuffle=True),
        make_loader(data, c, shuffle=False),
        c,
        Recorder(),
        tmp_path / "ema",
    )
    last = dict(averaged.named_parameters())
    assert any(not torch.allclose(expected[n], weights[n]) for n in names)  # the average is not the last step
    for n in names:
        torch.testing.assert_close(last[n].detach(), expected[n], rtol=1e-5, atol=1e-6, msg=n)
    assert result["last_val_loss"] == pytest.approx(
        evaluate(averaged, make_loader(data, c, shuffle=False), _cpu(), 1)["loss"]
    )
    saved = load_file(str(tmp_path / "ema" / "step_0000004" / EMA_FILE))
    assert set(saved) == set(names) and all(torch.equal(saved[n], last[n].detach()) for n in names)


def _cpu():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_ema_resumes_to_the_same_average(processor, tmp_path):
    data = windows(processor, 6)
    c = cfg(max_steps=6, save_every=4, lr_scheduler="constant", ema_decay=0.9)
    whole = make_policy(processor)
    train_policy(whole, make_loader(data, c, shuffle=True), None, c, Recorder(), tmp_path / "whole")
    first = cfg(max_steps=4, save_every=4, lr_scheduler="constant", ema_decay=0.9)
    train_policy(
        make_policy(processor), make_loader(data, first, shuffle=True), None, first, Recorder(), tmp_path / "run"
    )
    resumed = make_policy(processor, seed=123)
    assert (
        train_policy(resumed, make_loader(data, c, shuffle=True), None, c, Recorder(), tmp_path / "run")[
            "resumed_from_step"
        ]
        == 4
    )
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name  # the average continued, not restarted from the resumed weights

    # a checkpoint of a run without the average: one line, naming it and the way out
    plain = cfg(max_steps=2, save_every=2)
    train_policy(
        make_policy(processor), make_loader(data, plain, shuffle=True), None, plain, Recorder(), tmp_path / "plain"
    )
    longer = cfg(max_steps=3, save_every=2, ema_decay=0.9)
    with pytest.raises(
        VlaopsError, match=r"plain/step_0000002: no ema.safetensors, but train.ema_decay=0.9.*train.ema_decay=0"
    ):
        train_policy(
            make_policy(processor),
            make_loader(data, longer, shuffle=True),
            None,
            longer,
            Recorder(),
            tmp_path / "plain",
        )


@pytest.mark.slow
def test_compiled_layers_train_like_eager(processor, tmp_path):
    """train.compile=true compiles every Kosmos-2 layer in place (the CPU's compiler here; ~30 s): the same
    run gives the same losses and weights within float tolerance, and its checkpoints hold the same names."""
    from safetensors.torch import load_file

    from vlaops.train.setup import compile_layers

    data = windows(processor, 4)
    runs = {}
    for compiled in (False, True):
        c = cfg(max_steps=3, save_every=3, compile=compiled, val_every=3)
        policy, rec = make_policy(processor), Recorder()
        result = train_policy(
            policy,
            make_loader(data, c, shuffle=True),
            make_loader(data, c, shuffle=False),
            c,
            rec,
            tmp_path / str(compiled),
        )
        runs[compiled] = (policy, rec.series(TRAIN_LOSS), result["last_val_loss"])
    (eager, eager_losses, eager_val), (comp, comp_losses, comp_val) = runs[False], runs[True]
    layers = [*comp.backbone.vision_layers, *comp.backbone.decoder_layers]
    assert all(layer._compiled_call_impl is not None for layer in layers)  # Module.compile, in place
    assert len(layers) == compile_layers(make_policy(processor))
    assert [s for s, _ in comp_losses] == [s for s, _ in eager_losses]
    assert [v for _, v in comp_losses] == pytest.approx([v for _, v in eager_losses], rel=1e-4, abs=1e-5)
    assert comp_val == pytest.approx(eager_val, rel=1e-4, abs=1e-5)  # validation runs compiled too, in eval mode
    for (name, a), (_, b) in zip(eager.state_dict().items(), comp.state_dict().items()):
        torch.testing.assert_close(
            a, b, rtol=1e-4, atol=1e-4, msg=name
        )  # measured: at most 1.3e-5 apart; an Adam step moves ~1e-3
    saved = {c: set(load_file(str(tmp_path / str(c) / "step_0000003" / "model.safetensors"))) for c in (False, True)}
    assert saved[True] == saved[False] and not any("_orig_mod" in k for k in saved[True])
