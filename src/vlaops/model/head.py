"""The LSTM policy head ("cont-lstm-post"): per-frame features over the window -> C future actions.

After RoboVLMs' ``LSTMDecoder`` (robovlms/model/policy_head/base_policy.py): an LSTM (4 layers) over the
window of action-token features, then an MLP per output: arm via tanh (``MLPTanhHead``) and gripper.
RoboVLMs' ``MLPSigmoidHead`` applies the sigmoid inside the head; here the head returns logits and the
loss uses ``binary_cross_entropy_with_logits`` (numerically safer under bf16), the runtime the sigmoid.
A mobile base (``action_classes`` K >= 2) has a K-way classification MLP (``action_class``, cross-entropy)
for its action_type in place of the gripper; its continuous dims (linear_x, linear_y, angular_z) go
through the same tanh MLP (``arm``) as an arm's six.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vlaops.utils.bf16 import cpu_bf16_lstm_works


def _mlp(in_dim: int, dims: list[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear-ReLU stack, as RoboVLMs' MLPTanhHead/MLPSigmoidHead (1024, 512, 256) before the output."""
    layers: list[nn.Module] = []
    prev = in_dim
    for d in dims:
        layers += [nn.Linear(prev, d), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = d
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class LSTMPolicyHead(nn.Module):
    """(B, W, D) features -> arm (B, W, C, A-1) in [-1, 1] and gripper logits (B, W, C, 1), or with
    ``action_classes`` K >= 2, class logits (B, W, C, K).

    Every window step predicts the C actions that follow its frame, as the training batch's
    ``action_chunk`` (B, W, C, A) lays them out; the runtime reads the last step's first action.
    """

    def __init__(
        self,
        in_features: int,
        action_dim: int = 7,
        fwd_pred_next_n: int = 10,
        hidden_size: int = 1024,
        num_layers: int = 4,
        mlp_dims: list[int] | None = None,
        dropout: float = 0.0,
        action_classes: int = 0,
    ):
        super().__init__()
        self.action_dim = action_dim
        self.action_classes = action_classes
        self.fwd_pred_next_n = fwd_pred_next_n
        mlp_dims = list(mlp_dims) if mlp_dims is not None else [1024, 512, 256]
        # RoboVLMs lstm_decoder: nn.LSTM(batch_first=True, dropout=policy_rnn_dropout_p)
        self.rnn = nn.LSTM(
            input_size=in_features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.arm = _mlp(hidden_size, mlp_dims, fwd_pred_next_n * (action_dim - 1), dropout)
        if action_classes:  # a mobile base's action_type: K logits per chunk step
            self.action_class = _mlp(hidden_size, mlp_dims, fwd_pred_next_n * action_classes, dropout)
        else:
            self.gripper = _mlp(hidden_size, mlp_dims, fwd_pred_next_n, dropout)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, W, D) -> arm (B, W, C, A-1), gripper_logits (B, W, C, 1) (class logits (B, W, C, K)).

        The LSTM starts from a zero state at the first window step, in training and at run time alike,
        so a runtime window of the last W cached features sees what training saw.
        """
        b, w, _ = features.shape
        if features.device.type == "cpu" and _cpu_bf16_autocast() and not cpu_bf16_lstm_works():
            # oneDNN has no bf16 LSTM on this CPU (utils/bf16.py): the LSTM alone runs in fp32,
            # the backbone and the MLP heads stay in bf16
            with torch.autocast("cpu", enabled=False):
                x, _ = self.rnn(features.float())  # (B, W, H) fp32
        else:
            x, _ = self.rnn(features.to(self.rnn.weight_ih_l0.dtype))  # (B, W, H)
        arm = torch.tanh(self.arm(x)).view(b, w, self.fwd_pred_next_n, self.action_dim - 1)  # (B, W, C, A-1)
        if self.action_classes:
            return arm, self.action_class(x).view(
                b, w, self.fwd_pred_next_n, self.action_classes
            )  # (B, W, C, K) logits
        gripper = self.gripper(x).view(b, w, self.fwd_pred_next_n, 1)  # (B, W, C, 1) logits
        return arm, gripper
