"""Model configuration: plain dataclasses that Hydra registers as structured configs.

Only primitives, ``Optional`` primitives, lists and nested dataclasses, so an unknown or misspelt key is
an error at composition time. ``__post_init__`` validates at once and names the field and the value
(LeRobot's ``configuration_act.py`` habit). The defaults are the tiny, CPU-cheap architecture the
embedded pipeline and the tests use; the RoboVLMs values (configs/calvin_finetune/
finetune_kosmos_cont-lstm-post_full-ft_text_vision_wd-0_ws-8_act-10.json) are noted beside each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlaops.io.calvin_spec import ROBOT_OBS_DIM

LOSSES = ("huber", "mse")
BACKBONES = ("tiny", "pretrained")
AUX_INPUTS = ("image_tokens", "mean_image_token", "action_token")


def _positive(name: str, value: int | float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass
class TinyKosmosConfig:
    """Sizes of a tiny Kosmos-2 built from ``Kosmos2Config`` with random weights.

    Same classes as microsoft/kosmos-2-patch14-224 (text 2048x24, vision 1024x24, patch 14, 64 latent
    queries), shrunk so that a forward+backward over B*W=32 frames takes well under a second per
    frame on two CPU cores. Patch 32 at 224 px gives 7x7=49 patches instead of 256.
    """

    text_embed_dim: int = 64
    text_layers: int = 2
    text_attention_heads: int = 4
    text_ffn_dim: int = 128
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_attention_heads: int = 4
    vision_intermediate_size: int = 128
    # 16 px patches at the default 112 px: the same 7x7 grid as 32 at 224, a quarter of the pixels to
    # decode, augment and embed (train steps at batch 16: about 2 per second on 2 cores)
    patch_size: int = 16
    latent_query_num: int = 16
    dropout: float = 0.0  # Kosmos-2 uses 0.1; a 2-layer random model learns faster without
    # Initialisation scale. Kosmos-2's own (text init_std 0.02, vision initializer_factor 1.0) suits a
    # pretrained checkpoint; from random weights at this size it leaves the action token's feature all
    # but constant across frames (std ~1e-4 of its scale: L2-normalised patches through 0.02-std
    # projections drown under the sinusoidal positions), so the head sees no image and no instruction.
    # text_init_std 0.2 lets the instruction through. The image is stopped at the image-to-text interface:
    # Kosmos-2 L2-normalises each patch feature (norm 1) before the resampler's ``dense`` projection, whose
    # output is then concatenated with the std-1 latent queries as the resampler's keys and values; at
    # std 0.2 the patches are 5x smaller than the queries and the resampler output barely depends on the
    # image. ``image_projection_init_std`` 1.0 gives the projected patches the queries' scale. Measured on
    # 16 frames x 4 instructions of the default data (std of the action-token feature, whose overall std is
    # 1.0): across images 0.025 at 0.2, 0.31 at 1.0; across instructions 0.38 either way. The vision tower
    # keeps Kosmos-2's factor 1.0 (a factor of 10 reached 0.095 across images only by saturating the ViT's
    # attention: entropy 0.18 nats against 3.91 for uniform).
    text_init_std: float = 0.2
    vision_initializer_factor: float = 1.0
    image_projection_init_std: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "text_embed_dim",
            "text_layers",
            "text_attention_heads",
            "text_ffn_dim",
            "vision_hidden_size",
            "vision_layers",
            "vision_attention_heads",
            "vision_intermediate_size",
            "patch_size",
            "latent_query_num",
        ):
            _positive(f"tiny.{name}", getattr(self, name))
        if self.text_embed_dim % self.text_attention_heads:
            raise ValueError(
                f"tiny.text_embed_dim ({self.text_embed_dim}) must be divisible by "
                f"tiny.text_attention_heads ({self.text_attention_heads})"
            )
        if self.vision_hidden_size % self.vision_attention_heads:
            raise ValueError(
                f"tiny.vision_hidden_size ({self.vision_hidden_size}) must be divisible by "
                f"tiny.vision_attention_heads ({self.vision_attention_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"tiny.dropout must be in [0, 1), got {self.dropout!r}")
        _positive("tiny.text_init_std", self.text_init_std)
        _positive("tiny.vision_initializer_factor", self.vision_initializer_factor)
        _positive("tiny.image_projection_init_std", self.image_projection_init_std)


@dataclass
class ModelConfig:
    """The policy: Kosmos-2 backbone + action token + LSTM head ("cont-lstm-post", RoboVLMs)."""

    # "tiny": the tiny Kosmos-2 of ``tiny``, pretrained by ``vlaops pretrain`` (``pretrained_dir``, the
    # default: paths.pretrained_dir) or with random weights (``pretrained_dir`` null: the ablation);
    # "pretrained": the real weights in ``pretrained_dir`` (model=kosmos2). One explicit switch, so a
    # forgotten path for the real weights is an error rather than a silent fall-back to the tiny model.
    backbone: str = "tiny"
    # A local Kosmos-2 checkpoint directory (config + weights + processor files, as save_pretrained writes
    # them): what ``vlaops pretrain`` writes, or microsoft/kosmos-2-patch14-224. Never resolved against the
    # hub. With the tiny backbone its architecture must be ``tiny``'s and ``image_size``'s.
    pretrained_dir: str | None = "models/pretrained"
    tiny: TinyKosmosConfig = field(default_factory=TinyKosmosConfig)
    window_size: int = 8  # RoboVLMs window_size 8
    fwd_pred_next_n: int = 10  # RoboVLMs fwd_pred_next_n 10 (action chunk C)
    # The head's action space: A-1 continuous dims + a last dim that is the arm's gripper (action_classes 0:
    # one logit, BCE) or a class of action_classes >= 2 values (a mobile base's action_type: K logits,
    # cross-entropy). The train stage sets both from the data (normalization.json) and the export keeps
    # them, so inference rebuilds that head; these values are for a policy built without data (tests, bench).
    action_dim: int = 7  # 6 arm dims + gripper; a mobile base: linear_x, linear_y, angular_z + action_type
    action_classes: int = 0
    image_size: int = 112  # Kosmos-2 224 (model=kosmos2 sets it)
    use_hand_rgb: bool = True  # feed the gripper camera too (RoboVLMs use_hand_rgb true)
    # Fill the history at an episode's start by repeating its first frame (LeRobot's and Diffusion
    # Policy's observation padding), and train on the windows that end there (padded positions carry no
    # loss). RoboVLMs (false) grows the history from one frame: an episode's first steps then read the
    # LSTM's first positions, which every window trains on whatever frame it starts at, so the policy can
    # tell an episode's start (where the arm turns towards its block) only from the image.
    pad_history: bool = True
    max_text_len: int = 32
    vocab_size: int = 1000  # target size of the Unigram vocabulary trained on the instructions (tiny only)
    lstm_hidden_size: int = 128  # RoboVLMs 1024
    # RoboVLMs 4 (model=kosmos2). From scratch, a 4-layer LSTM at PyTorch's default init passes almost
    # nothing to the heads (output std 1e-4 across frames against 0.027 for one layer; its gradients 0.006).
    lstm_num_layers: int = 1
    head_mlp_dims: list[int] = field(default_factory=lambda: [256, 128, 64])  # RoboVLMs [1024, 512, 256]
    head_dropout: float = 0.0  # RoboVLMs policy_rnn_dropout_p 0.0
    loss: str = "huber"
    # RoboVLMs 0.01 (model=kosmos2), for a pretrained backbone. On the first simulator (blocks in a row)
    # 0.01 left the gripper at the constant baseline (accuracy 0.755 against 0.750) and 0.1 learnt it.
    # The gripper term also competes with the arm for the backbone: on data of an earlier simulator the
    # next action's x-y was learnt at 0.03 (with chunk_loss_decay 0.5) and not at 0.1, the gripper still
    # learnt (accuracy 0.93); not reproduced on the current simulator (docs/results.md).
    arm_gripper_loss_ratio: float = 0.03
    # Weight of chunk step c in the loss: chunk_loss_decay**c (RoboVLMs: 1.0, a plain mean over the chunk).
    # The runtime executes step 0 only; with a plain mean the later steps (less predictable: when the
    # arm stops, turns or closes) dominate the gradient. On data of an earlier simulator (blocks in a
    # row) 0.5 with gripper ratio 0.03 taught the next action's x-y where 1.0 did not; on the current
    # simulator neither did in 200 steps (bench/learning_signal.py, docs/results.md): re-measure.
    chunk_loss_decay: float = 0.5
    # An auxiliary training target: linear read-outs of named features (``aux_inputs``) regress dims of the
    # robot's own state (``aux_robot_dims`` of CALVIN's robot_obs: what any robot records), standardised by the
    # training split's statistics.yaml; their MSEs are summed and weighted by ``aux_weight`` (0: off, no
    # read-out is built). Training only: inference ignores the read-outs. No target reads the simulator's
    # scene state (where the objects are): a robot records none, so a recipe that needs it cannot be a team's
    # recipe; where the objects are comes from the pretrained backbone (the pretrain stage).
    # Inputs: "image_tokens" (the static camera's resampler output, flattened), "mean_image_token" (their
    # mean: what a uniform attention over them passes on), "action_token" (the feature the LSTM head reads).
    aux_weight: float = 0.3
    aux_inputs: list[str] = field(default_factory=lambda: ["image_tokens", "action_token"])
    aux_robot_dims: list[int] = field(default_factory=lambda: [0, 1, 2])  # the TCP position
    # Also regress those dims at the annotated span's last frame: where the robot's own TCP ends the subtask
    # (a lift ends over the block it was told to lift, a push beside it). Hindsight from the recording itself,
    # as a goal-conditioned policy relabels its goals: the link between the instruction's words and a place in
    # the image that the simulator's block positions once supplied, from what any robot records.
    aux_goal: bool = False

    @property
    def aux_target_dim(self) -> int:
        """Width of the read-outs' target: the robot_obs dims now, and again at the span's end with aux_goal."""
        return len(self.aux_robot_dims) * (2 if self.aux_goal else 1)

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):  # built from a plain dict (policy_config.json)
            self.tiny = TinyKosmosConfig(**self.tiny)
        for name in (
            "window_size",
            "fwd_pred_next_n",
            "image_size",
            "max_text_len",
            "vocab_size",
            "lstm_hidden_size",
            "lstm_num_layers",
        ):
            _positive(name, getattr(self, name))
        if self.action_dim < 2:
            raise ValueError(f"action_dim must be >= 2 (arm dims + gripper), got {self.action_dim!r}")
        if self.action_classes < 0 or self.action_classes == 1:
            raise ValueError(
                f"action_classes must be 0 (a gripper) or >= 2 (a class head), got {self.action_classes!r}"
            )
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 (<s>, a token, </s>), got {self.max_text_len!r}")
        if not self.head_mlp_dims or any(d <= 0 for d in self.head_mlp_dims):
            raise ValueError(f"head_mlp_dims must be a non-empty list of positive ints, got {self.head_mlp_dims!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 < self.chunk_loss_decay <= 1.0:
            raise ValueError(f"chunk_loss_decay must be in (0, 1], got {self.chunk_loss_decay!r}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight!r}")
        if (
            not self.aux_inputs
            or any(i not in AUX_INPUTS for i in self.aux_inputs)
            or len(set(self.aux_inputs)) < len(self.aux_inputs)
        ):
            raise ValueError(f"aux_inputs must be a non-empty list of distinct {AUX_INPUTS}, got {self.aux_inputs!r}")
        dims = self.aux_robot_dims
        if any(not 0 <= d < ROBOT_OBS_DIM for d in dims) or len(set(dims)) < len(dims):
            raise ValueError(
                f"aux_robot_dims must list distinct CALVIN robot_obs indices 0..{ROBOT_OBS_DIM - 1}, got {dims!r}"
            )
        if self.aux_weight > 0 and not dims:
            raise ValueError("aux_weight > 0 needs a target: model.aux_robot_dims")
        if self.aux_goal and self.aux_weight <= 0:
            raise ValueError("aux_goal needs the read-outs on: model.aux_weight > 0")
        if self.arm_gripper_loss_ratio < 0:
            raise ValueError(f"arm_gripper_loss_ratio must be >= 0, got {self.arm_gripper_loss_ratio!r}")
        if self.pretrained_dir == "":
            raise ValueError("pretrained_dir must be a directory path or null, got ''")
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "pretrained" and self.pretrained_dir is None:
            raise ValueError(
                "model.pretrained_dir must name a local directory holding microsoft/kosmos-2-patch14-224 "
                "when model.backbone is 'pretrained' (e.g. model.pretrained_dir=/path/to/kosmos-2-patch14-224)"
            )
