"""The model package on a tiny random Kosmos-2: processor, backbone, loss, train_setup, export + runtime."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import INSTRUCTIONS, synthetic_batch
from transformers import AutoProcessor, Kosmos2Processor

from vlaops.data import keys
from vlaops.data.normalization import ActionNormalizer
from vlaops.data.tokens import tokenize
from vlaops.errors import VlaopsError
from vlaops.model import (
    ModelConfig,
    PolicyRuntime,
    TinyKosmosConfig,
    VLAPolicy,
    load_processor,
    make_processor,
    merged_state_dict,
    save_policy,
)
from vlaops.train.config import TrainSetupConfig
from vlaops.train.setup import apply_train_setup, is_checkpointing

B, W, C, A, L = 2, 3, 4, 7, 16


def small_cfg(**kw) -> ModelConfig:
    """Kosmos-2's 224 px (the tests' images) with 32 px patches: the default's 7x7 patch grid."""
    base = dict(
        window_size=W,
        fwd_pred_next_n=C,
        max_text_len=L,
        lstm_hidden_size=32,
        lstm_num_layers=2,
        head_mlp_dims=[32],
        vocab_size=200,
        image_size=224,
        pretrained_dir=None,  # random weights
    )
    base.update(kw)
    base["tiny"] = dataclasses.replace(base.get("tiny") or TinyKosmosConfig(), patch_size=32)
    return ModelConfig(**base)


def make_policy(processor, seed: int = 0, **kw) -> VLAPolicy:
    torch.manual_seed(seed)
    return VLAPolicy.build(small_cfg(**kw), len(processor.tokenizer))


def make_batch(processor, seed: int = 0, size: int = 224) -> dict:
    return synthetic_batch(processor, B, W, C, L, seed, size)


# ---- processor --------------------------------------------------------------------------------------
def test_processor_round_trips_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path / "proc")
    loaded = AutoProcessor.from_pretrained(tmp_path / "proc", local_files_only=True)
    assert isinstance(loaded, Kosmos2Processor)
    assert len(loaded.tokenizer) == len(processor.tokenizer)
    ids, mask = tokenize(processor, ["open the drawer", "an unseen instruction, with punctuation!"], L)
    ids2, mask2 = tokenize(loaded, ["open the drawer", "an unseen instruction, with punctuation!"], L)
    assert ids.shape == (2, L) and ids.dtype == torch.long and mask.dtype == torch.long
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    tok = processor.tokenizer
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)  # Kosmos2TextConfig defaults
    assert ids[0, 0] == 0 and mask[0].sum() < L and ids[0, mask[0].sum() - 1] == 2  # <s> ... </s> <pad>...
    # Kosmos2Processor adds its tag and patch-index tokens: the model vocabulary is len(tokenizer)
    assert "<image>" in tok.get_vocab() and len(tok) > tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert isinstance(load_processor(tmp_path / "proc"), Kosmos2Processor)


def test_load_processor_missing_dir_is_clear(tmp_path):
    with pytest.raises(VlaopsError, match="processor directory not found"):
        load_processor(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        VlaopsError,
        match=r"model.pretrained_dir=.*/empty: no config.json, no model.safetensors or "
        r"pytorch_model.bin, no tokenizer.json or tokenizer_config.json",
    ):
        make_processor(ModelConfig(backbone="pretrained", pretrained_dir=str(tmp_path / "empty")), INSTRUCTIONS)
    built = make_processor(ModelConfig(vocab_size=50, pretrained_dir=None), INSTRUCTIONS)
    assert built.tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False) <= 50


def test_truncation_keeps_eos(processor):
    ids, mask = tokenize(processor, ["push the red block left " * 10], 8)
    assert ids.shape == (1, 8) and mask.sum() == 8 and ids[0, -1] == 2


# ---- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, field",
    [
        ({"loss": "l1"}, "loss"),
        ({"window_size": 0}, "window_size"),
        ({"head_mlp_dims": []}, "head_mlp_dims"),
        ({"action_dim": 1}, "action_dim"),
    ],
)
def test_model_config_names_bad_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_tiny_config_validates():
    with pytest.raises(ValueError, match="tiny.text_embed_dim"):
        TinyKosmosConfig(text_embed_dim=30, text_attention_heads=4)


# ---- backbone + head --------------------------------------------------------------------------------
def test_backbone_and_policy_shapes(processor):
    policy = make_policy(processor)
    batch = make_batch(processor)
    d = policy.backbone.hidden_size
    feats = policy.encode_frames(
        batch[keys.RGB][:, 0], batch[keys.HAND_RGB][:, 0], batch[keys.TEXT], batch[keys.TEXT_MASK]
    )
    assert feats.shape == (B, d)
    out = policy(batch)
    assert out["arm"].shape == (B, W, C, A - 1) and out["gripper_logits"].shape == (B, W, C, 1)
    assert out["arm"].abs().max() <= 1.0
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    arm, prob = policy.predict_from_features(torch.randn(B, W, d))
    assert arm.shape == (B, W, C, A - 1) and prob.shape == (B, W, C, 1) and ((prob >= 0) & (prob <= 1)).all()
    # static camera only
    static_only = make_policy(processor, use_hand_rgb=False)
    assert static_only.backbone.num_image_tokens == static_only.backbone.model.config.latent_query_num
    assert static_only(batch)["arm"].shape == (B, W, C, A - 1)


def test_action_token_feature_ignores_padding_length(processor):
    """The action token goes right after the last real token, so padding does not move or change it."""
    policy = make_policy(processor).eval()
    rgb, hand = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 224, 224)
    short = tokenize(processor, ["open the drawer"], 12)
    long = tokenize(processor, ["open the drawer"], 24)
    with torch.no_grad():
        f1 = policy.encode_frames(rgb, hand, *short)
        f2 = policy.encode_frames(rgb, hand, *long)
        f3 = policy.encode_frames(rgb, hand, *tokenize(processor, ["turn on the led"], 12))
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(f1, f3)  # ... and the instruction does reach it


def _frame_features(policy: VLAPolicy, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of 6 frames of a block shifting on a plain table, under two instructions: (6, D) each."""
    img = torch.zeros(6, 224, 224, 3, dtype=torch.uint8)
    img[..., 1] = 120  # table
    for i in range(6):
        img[i, 100:130, 40 + 20 * i : 70 + 20 * i, 0] = 220  # the red block moves right
    from vlaops.data.transforms import to_model_input

    x = to_model_input(img, 224)
    with torch.no_grad():
        return tuple(policy.encode_frames(x, x, *tokenize(processor, [t] * 6, L)) for t in INSTRUCTIONS[1:3])


def test_tiny_init_lets_image_and_instruction_reach_the_action_token(processor):
    """With Kosmos-2's pretrained-model init (0.02) the tiny random backbone's feature is nearly
    constant across frames and instructions, and the head is blind; the tiny init keeps both visible."""
    policy = make_policy(processor).eval()
    push, turn = _frame_features(policy, processor)
    scale = push.abs().mean()
    assert push.std(0).mean() > 0.02 * scale  # frames differ
    assert (push - turn).abs().mean() > 0.02 * scale  # instructions differ
    weak = make_policy(processor, tiny=TinyKosmosConfig(text_init_std=0.02, image_projection_init_std=0.02)).eval()
    push_weak, _ = _frame_features(weak, processor)
    assert push_weak.std(0).mean() < 0.1 * push.std(0).mean()


def test_image_reaches_the_action_token_through_the_resampler_not_a_saturated_vision_tower(processor):
    """The image is carried by the resampler's patch projection at the latent queries' scale
    (image_projection_init_std), with the vision tower at Kosmos-2's own init: its attention stays
    spread over the patches (a factor of 10 saturated it), and a small projection starves the image."""
    policy = make_policy(processor).eval()
    push, _ = _frame_features(policy, processor)
    small = make_policy(processor, tiny=TinyKosmosConfig(image_projection_init_std=0.2)).eval()
    push_small, _ = _frame_features(small, processor)
    assert push.std(0).mean() > 3 * push_small.std(0).mean()

    vision = policy.backbone.vision_encoder
    vision.set_attn_implementation("eager")  # sdpa returns no attention weights
    with torch.no_grad():
        attn = vision(torch.randn(2, 3, 224, 224), output_attentions=True).attentions  # each (N, heads, T, T)
    assert len(attn) == policy.cfg.tiny.vision_layers
    for a in attn:
        entropy = -(a.clamp_min(1e-12).log() * a).sum(-1).mean()
        assert entropy > 0.5 * math.log(a.shape[-1])  # uniform over T tokens is log(T)


def test_masked_chunk_steps_do_not_change_the_loss(processor):
    policy = make_policy(processor).eval()
    batch = make_batch(processor)
    with torch.no_grad():
        base = policy(batch)
        changed = dict(batch)
        chunk = batch[keys.ACTION_CHUNK].clone()
        past_end = ~batch[keys.CHUNK_MASK]  # (B, W, C): steps past the episode's end
        assert past_end.any()
        chunk[past_end] = float("nan")  # masked-out steps: anything, even NaN
        changed[keys.ACTION_CHUNK] = chunk
        masked = policy(changed)
        chunk2 = batch[keys.ACTION_CHUNK].clone()
        assert batch[keys.CHUNK_MASK][0, -1, 0]
        chunk2[0, -1, 0, 0] = -chunk2[0, -1, 0, 0] + 0.5  # a valid step: must matter
        changed[keys.ACTION_CHUNK] = chunk2
        unmasked = policy(changed)
    for k in ("loss", "arm_loss", "gripper_loss"):
        torch.testing.assert_close(base[k], masked[k])
    assert not torch.isclose(base["arm_loss"], unmasked["arm_loss"])
    # and no NaN gradient leaks from the masked targets
    policy.train()
    changed[keys.ACTION_CHUNK] = chunk
    policy(changed)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_mse_loss_and_gripper_ratio(processor):
    policy = make_policy(processor, loss="mse", arm_gripper_loss_ratio=0.5).eval()
    with torch.no_grad():
        out = policy(make_batch(processor))
    torch.testing.assert_close(out["loss"], out["arm_loss"] + 0.5 * out["gripper_loss"])


def test_chunk_loss_decay_weighs_chunk_step_c_by_decay_to_the_c(processor):
    """The loss is the weighted mean over the valid (b, w, c) steps, weight decay**c; 1.0 is the plain mean."""
    batch = make_batch(processor)
    with torch.no_grad():
        outs = {d: make_policy(processor, loss="mse", chunk_loss_decay=d).eval()(batch) for d in (1.0, 0.5)}
    target, mask = batch[keys.ACTION_CHUNK], batch[keys.CHUNK_MASK].float()  # (B, W, C, A), (B, W, C)
    per_step = (outs[1.0]["arm"] - target[..., :-1]).pow(2).mean(-1)  # (B, W, C): same weights either way
    for decay, out in outs.items():
        weight = mask * decay ** torch.arange(mask.shape[-1], dtype=torch.float32)
        torch.testing.assert_close(out["arm_loss"], (per_step * weight).sum() / weight.sum())
    assert not torch.isclose(outs[1.0]["arm_loss"], outs[0.5]["arm_loss"])
    with pytest.raises(ValueError, match="chunk_loss_decay"):
        ModelConfig(chunk_loss_decay=0.0)


@pytest.mark.parametrize("read_from", [["image_tokens"], ["mean_image_token", "action_token"]])
def test_aux_loss_reads_its_inputs_and_adds_into_the_loss(processor, read_from):
    """``aux_weight``: a linear read-out of the static image tokens (or their mean, or the action token)
    regresses the batch's ``aux_target``; the MSEs are added with their weight, and reach the resampler."""
    batch = make_batch(processor)
    batch[keys.AUX_TARGET] = torch.randn(B, W, 3, generator=torch.Generator().manual_seed(1))
    plain = make_policy(processor, loss="mse", aux_weight=0.0).eval()
    aux = make_policy(
        processor,
        loss="mse",
        aux_weight=0.5,
        aux_inputs=read_from,
        aux_robot_dims=[0, 1, 2],
    ).eval()
    assert plain.aux_heads is None
    q, d = aux.backbone.model.config.latent_query_num, aux.backbone.hidden_size
    assert {k: h.in_features for k, h in aux.aux_heads.items()} == {
        k: q * d if k == "image_tokens" else d for k in read_from
    }
    with torch.no_grad():
        a, p = aux(batch), plain(batch)
        feats, tokens = aux.backbone(
            batch[keys.RGB].flatten(0, 1),
            batch[keys.HAND_RGB].flatten(0, 1),
            batch[keys.TEXT].repeat_interleave(W, 0),
            batch[keys.TEXT_MASK].repeat_interleave(W, 0),
            return_image_tokens=True,
        )
        # the static camera's tokens: what encode_images gives for the static frames alone
        torch.testing.assert_close(tokens, aux.backbone.encode_images(batch[keys.RGB].flatten(0, 1)))
        reads = {"image_tokens": tokens.flatten(1), "mean_image_token": tokens.mean(1), "action_token": feats}
        expected = sum(
            (aux.aux_heads[k](reads[k]) - batch[keys.AUX_TARGET].flatten(0, 1)).pow(2).mean() for k in read_from
        )
    torch.testing.assert_close(a["aux_loss"], expected)
    torch.testing.assert_close(a["loss"], a["arm_loss"] + 0.03 * a["gripper_loss"] + 0.5 * a["aux_loss"])
    torch.testing.assert_close(a["arm_loss"], p["arm_loss"])  # same seed, same backbone: the read-out is extra
    torch.testing.assert_close(a["policy_loss"], p["loss"])  # what offline evaluation reports
    assert "aux_loss" not in p
    grads = []
    for policy in (aux, plain):  # the read-out's loss reaches the resampler: its gradient there differs
        policy.train()
        policy(batch)["loss"].backward()
        grads.append(policy.backbone.resampler.dense.weight.grad)
    assert not torch.allclose(*grads)
    for bad in (["pixels"], [], ["action_token", "action_token"]):
        with pytest.raises(ValueError, match="aux_inputs"):
            ModelConfig(aux_inputs=bad)
    with pytest.raises(ValueError, match="aux_robot_dims"):
        ModelConfig(aux_weight=1.0, aux_robot_dims=[15])
    with pytest.raises(ValueError, match="aux_robot_dims"):
        ModelConfig(aux_robot_dims=[0, 0])
    with pytest.raises(ValueError, match="needs a target"):
        ModelConfig(aux_weight=1.0, aux_robot_dims=[])
    # the simulator's scene state is no target any more: an old key is an unknown key
    with pytest.raises(TypeError, match="aux_scene_dims"):
        ModelConfig(aux_scene_dims=[6, 7])


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _setup(processor, **kw):
    policy = make_policy(processor)
    counts = apply_train_setup(policy, TrainSetupConfig(**kw))
    return policy, policy.backbone, counts


def test_default_train_setup_trains_everything(processor):
    policy, bb, counts = _setup(processor)
    assert counts["params_trainable"] == counts["params_total"] == sum(p.numel() for p in policy.parameters())


@pytest.mark.parametrize(
    "kw, frozen_attr",
    [
        ({"train_vision": False}, "vision_encoder"),
        ({"train_text_embedding": False}, "text_embeddings"),
        ({"freeze_resampler": True}, "resampler"),
    ],
)
def test_each_module_flag_freezes_its_module(processor, kw, frozen_attr):
    policy, bb, counts = _setup(processor, **kw)
    assert _trainable(getattr(bb, frozen_attr)) == 0
    assert counts["params_trainable"] == counts["params_total"] - sum(
        p.numel() for p in getattr(bb, frozen_attr).parameters()
    )


def test_freeze_backbone(processor):
    policy, bb, _ = _setup(
        processor, freeze_backbone=True, train_vision=False, train_text_embedding=False, freeze_resampler=True
    )
    # only the action token and the heads (the auxiliary read-outs included) are left
    assert _trainable(bb.model) == 0 and bb.action_token.requires_grad
    assert _trainable(policy) == _trainable(policy.head) + _trainable(policy.aux_heads) + bb.action_token.numel()
    # RoboVLMs precedence: the per-module flags still act on a frozen backbone
    _, bb2, _ = _setup(processor, freeze_backbone=True)
    assert _trainable(bb2.decoder_layers) == 0
    assert _trainable(bb2.vision_encoder) > 0 and _trainable(bb2.resampler) > 0 and _trainable(bb2.text_embeddings) > 0


def test_train_decoder_layers_keeps_only_the_last_n(processor):
    policy, bb, _ = _setup(processor, train_decoder_layers=1)
    layers = bb.decoder_layers
    assert len(layers) == 2
    assert _trainable(layers[0]) == 0 and _trainable(layers[1]) == sum(p.numel() for p in layers[1].parameters())
    assert _trainable(bb.vision_encoder) > 0  # the module flags still apply


def test_lora_adapters_on_the_text_decoder(processor, tmp_path):
    policy, bb, counts = _setup(processor, lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    lora = {n for n, p in bb.model.named_parameters() if "lora_" in n}
    assert lora and all(n.startswith("text_model.model.layers.") for n in lora)
    assert any(".self_attn.q_proj." in n for n in lora) and any(".self_attn.v_proj." in n for n in lora)
    assert all(p.requires_grad for n, p in bb.model.named_parameters() if "lora_" in n)
    base = [p for n, p in bb.decoder_layers.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    # train_vision etc. keep their RoboVLMs meaning beside LoRA
    assert _trainable(bb.vision_encoder) > 0
    with pytest.raises(ValueError, match="already"):
        apply_train_setup(policy, TrainSetupConfig(lora_enable=True))
    # the merged state dict has the plain policy's keys and carries the adapters' effect
    plain = make_policy(processor)
    for n, p in bb.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    merged = merged_state_dict(policy)
    assert set(merged) == set(plain.state_dict())
    key = "backbone.model.text_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[key], policy.state_dict()[key.replace("q_proj.", "q_proj.base_layer.")])
    # ... and unmerged the live model again
    x = torch.randn(1, 5, bb.hidden_size)
    q = bb.decoder_layers[0].self_attn.q_proj
    torch.testing.assert_close(
        q(x), q.base_layer(x) + q.lora_B["default"](q.lora_A["default"](x)) * q.scaling["default"]
    )


def test_lora_target_must_match(processor):
    policy = make_policy(processor)
    with pytest.raises(ValueError, match="lora_target_modules"):
        apply_train_setup(policy, TrainSetupConfig(lora_enable=True, lora_target_modules=["nope_proj"]))


def test_gradient_checkpointing_flag(processor):
    policy, bb, _ = _setup(processor, gradient_checkpointing=True)
    assert is_checkpointing(bb.model)
    policy.train()
    policy(make_batch(processor))["loss"].backward()
    assert bb.vision_encoder.model.encoder.layers[0].mlp.fc1.weight.grad is not None
    apply_train_setup(policy, TrainSetupConfig())
    assert not is_checkpointing(bb.model)


def test_train_setup_config_validates():
    with pytest.raises(ValueError, match="precision"):
        TrainSetupConfig(precision="fp8")
    with pytest.raises(ValueError, match="train_decoder_layers"):
        TrainSetupConfig(train_decoder_layers=-2)


# ---- export + runtime ----------------------------------------------------------------------------------
def _obs(rng: np.random.Generator, nested: bool = False) -> dict:
    cams = {
        "rgb_static": rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),  # CALVIN's sizes
        "rgb_gripper": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8),
    }
    return {"rgb_obs": cams} if nested else cams


@pytest.fixture(scope="module")
def exported(processor, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "policy"
    policy = make_policy(processor)
    apply_train_setup(policy, TrainSetupConfig(lora_enable=True, lora_r=4))
    save_policy(out, policy, processor, ActionNormalizer(), policy.cfg, extra={"train_config": {"max_steps": 3}})
    return out, policy


def test_save_policy_layout(exported):
    out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "backbone_config.json",
        "policy_config.json",
        "processor",
        "normalization.json",
        "train_config.json",
    } <= names
    assert not [n for n in names if n.startswith(".")]


def test_policy_load_and_step(exported):
    out, trained = exported
    policy = PolicyRuntime.load(out, device="cpu")
    calls = []
    policy.model.backbone.register_forward_hook(lambda *a: calls.append(1))
    rng = np.random.default_rng(0)
    policy.reset()
    for i in range(W + 2):
        action = policy.step(_obs(rng, nested=i % 2 == 1), "open the drawer")
        assert action.shape == (7,) and action.dtype == np.float64
        assert action[-1] in (-1.0, 1.0)
        assert np.all(np.abs(action[:6]) <= 0.65 + 1e-9)
        assert len(calls) == i + 1  # one backbone call per step: earlier frames come from the cache
        assert len(policy._features) == W  # the first frame fills the history (pad_history); then capped
    # the loaded weights are the trained policy's (LoRA merged): same features as the live model
    obs = _obs(rng)
    policy.reset()
    policy.step(obs, "lift the blue block")
    from vlaops.data.transforms import to_model_input

    rgb = to_model_input(torch.from_numpy(obs["rgb_static"])[None], 224)
    hand = to_model_input(torch.from_numpy(obs["rgb_gripper"])[None], 224)
    text = tokenize(trained_processor := policy.processor, ["lift the blue block"], L)
    with torch.no_grad():
        live = trained.eval().encode_frames(rgb, hand, *text)
    torch.testing.assert_close(policy._features[-1], live, rtol=1e-4, atol=1e-5)
    assert trained_processor is policy.processor
    # a new instruction starts a new history, filled with its first frame
    policy.step(obs, "open the drawer")
    assert len(policy._features) == W and all(f is policy._features[0] for f in policy._features)


def test_encode_is_the_step_without_the_history(exported):
    """``encode`` (what ``step`` runs, one backbone call) is the backbone over ``images`` and ``text``, and
    leaves the history alone unless the instruction changes."""
    out, _ = exported
    policy = PolicyRuntime.load(out, device="cpu")
    rng = np.random.default_rng(2)
    policy.reset()
    policy.step(_obs(rng), "open the drawer")
    obs = _obs(rng, nested=True)
    feat = policy.encode(obs, "open the drawer")
    assert feat.shape == (1, policy.model.backbone.hidden_size) and len(policy._features) == W
    rgb, hand = policy.images(obs)
    assert rgb.shape == hand.shape == (1, 3, 224, 224)
    ids, mask = policy.text("open the drawer")
    assert ids.shape == mask.shape == (1, L)
    with torch.no_grad():
        torch.testing.assert_close(feat, policy.model.encode_frames(rgb, hand, ids, mask))
    action = policy.step(obs, "open the drawer")
    torch.testing.assert_close(policy._features[-1], feat)  # step appends what encode computes
    assert len(policy._features) == W and action.shape == (7,)
    policy.encode(obs, "lift the blue block")  # another instruction: the old features no longer apply
    assert len(policy._features) == 0


@pytest.mark.parametrize("pad_history", [True, False])
def test_policy_step_acts_as_the_training_forward_on_the_same_window(exported, pad_history):
    """The feature cache is an optimisation only: at every step, past the window fill too, the action
    equals the training forward over the window training builds there (bench/policy_step.py times it):
    the first frame repeated to fill it (pad_history), or the frames so far (RoboVLMs' growing history)."""
    from vlaops.data.transforms import to_model_input

    out, _ = exported
    policy = PolicyRuntime.load(out, device="cpu")
    policy.cfg.pad_history = pad_history
    rng = np.random.default_rng(1)
    frames, instruction = [], "push the red block left"
    policy.reset()
    for _ in range(W + 3):
        obs = _obs(rng)
        frames.append([to_model_input(torch.from_numpy(obs[k])[None], 224) for k in ("rgb_static", "rgb_gripper")])
        action = policy.step(obs, instruction)
        window = ([frames[0]] * (W - 1) + frames if pad_history else frames)[-W:]
        text, text_mask = tokenize(policy.processor, [instruction], L)
        batch = {
            keys.RGB: torch.cat([f[0] for f in window])[None],  # (1, w, 3, S, S)
            keys.HAND_RGB: torch.cat([f[1] for f in window])[None],
            keys.TEXT: text,
            keys.TEXT_MASK: text_mask,
            keys.ACTION_CHUNK: torch.zeros(1, len(window), C, A),
            keys.CHUNK_MASK: torch.ones(1, len(window), C, dtype=torch.bool),
        }
        with torch.no_grad():
            full = policy.model(batch)
        first = torch.cat([full["arm"][0, -1, 0], torch.sigmoid(full["gripper_logits"][0, -1, 0])]).numpy()
        np.testing.assert_allclose(action, policy.normalizer.denormalize(first.astype(np.float64)), atol=1e-5)


def test_policy_load_empty_dir_names_the_missing_file(tmp_path):
    with pytest.raises(VlaopsError, match="model.safetensors"):
        PolicyRuntime.load(tmp_path)
    with pytest.raises(VlaopsError, match="not found"):
        PolicyRuntime.load(tmp_path / "absent")


def test_policy_step_needs_the_gripper_camera(exported):
    policy = PolicyRuntime.load(exported[0])
    with pytest.raises(VlaopsError, match="rgb_gripper"):
        policy.step({"rgb_static": np.zeros((200, 200, 3), np.uint8)}, "open the drawer")


def test_pretrained_dir_loads_locally(processor, tmp_path):
    """The pretrained path on a tiny checkpoint saved like microsoft/kosmos-2-patch14-224 (no hub)."""
    with pytest.raises(VlaopsError, match=r"model.pretrained_dir=.*/none: directory not found"):
        VLAPolicy.build(
            small_cfg(backbone="pretrained", pretrained_dir=str(tmp_path / "none")), len(processor.tokenizer)
        )
    tiny = make_policy(processor)
    tiny.backbone.model.config.save_pretrained(tmp_path / "kosmos")
    processor.save_pretrained(tmp_path / "kosmos")
    with pytest.raises(VlaopsError, match=r"/kosmos: no model.safetensors or pytorch_model.bin;"):
        VLAPolicy.build(
            small_cfg(backbone="pretrained", pretrained_dir=str(tmp_path / "kosmos")), len(processor.tokenizer)
        )
    tiny.backbone.model.save_pretrained(tmp_path / "kosmos")
    cfg = small_cfg(backbone="pretrained", pretrained_dir=str(tmp_path / "kosmos"))
    proc = make_processor(cfg, [])
    loaded = VLAPolicy.build(cfg, len(proc.tokenizer))
    for k, v in tiny.backbone.model.state_dict().items():
        torch.testing.assert_close(loaded.backbone.model.state_dict()[k], v, msg=k)
    with pytest.raises(VlaopsError, match="vocab_size"):
        VLAPolicy.build(cfg, len(proc.tokenizer) + 1)


def test_a_truncated_weights_file_is_named(exported, tmp_path):
    import shutil

    from vlaops.model.runtime import load_policy_model

    broken = tmp_path / "policy"
    shutil.copytree(exported[0], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VlaopsError, match=rf"^{broken}/model.safetensors: not a readable safetensors file"):
        load_policy_model(broken)


def test_safetensors_files_are_the_same_bytes_whatever_the_process(tmp_path):
    """safetensors orders a header's metadata by a per-process hash: ``save_canonical`` sorts it, so the same
    weights give the same bytes in any run (DVC would otherwise see a re-trained, identical policy as new),
    and the file still loads, tensors and metadata alike."""
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    script = (
        "import sys, torch; from pathlib import Path; from vlaops.model.runtime import save_canonical; "
        "save_canonical({'b': torch.arange(6.0).view(2, 3), 'a': torch.ones(5, dtype=torch.int64)}, "
        "Path(sys.argv[1]), {'format': 'pt', 'vlaops_format_version': '1', 'zeta': 'z', 'alpha': 'a'})"
    )
    paths = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for path in paths:  # separate processes: each draws its own hash seed
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    raw = paths[0].read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata()["zeta"] == "z"
        torch.testing.assert_close(f.get_tensor("b"), torch.arange(6.0).view(2, 3))
        assert f.get_tensor("a").tolist() == [1] * 5
