"""The policy model: Kosmos-2 backbone + action token + LSTM head, its offline processor, and the
exported runtime (RoboVLMs "cont-lstm-post", window 8, chunk 10)."""

from vlaops.model.backbone import KosmosBackbone, tiny_kosmos_config
from vlaops.model.config import ModelConfig, TinyKosmosConfig
from vlaops.model.head import LSTMPolicyHead
from vlaops.model.policy import VLAPolicy, apply_train_setup, merged_state_dict
from vlaops.model.processor import build_offline_processor, load_processor, make_processor, tokenize
from vlaops.model.runtime import Policy, load_policy_model, save_policy

__all__ = [
    "KosmosBackbone",
    "LSTMPolicyHead",
    "ModelConfig",
    "Policy",
    "TinyKosmosConfig",
    "VLAPolicy",
    "apply_train_setup",
    "build_offline_processor",
    "load_policy_model",
    "load_processor",
    "make_processor",
    "merged_state_dict",
    "save_policy",
    "tiny_kosmos_config",
    "tokenize",
]
