"""Training-batch keys: the RoboVLMs custom-dataset contract, what every batch the model trains on holds.

W = window_size, C = fwd_pred_next_n, A = action dim (7 for an arm), L = text length.
"""

RGB = "rgb"  # (B, W, 3, H, W) float, CLIP-normalised static camera
HAND_RGB = "hand_rgb"  # (B, W, 3, h, w) float, CLIP-normalised gripper camera
ACTION = "action"  # (B, W, A) normalised actions of the window frames
ACTION_CHUNK = "action_chunk"  # (B, W, C, A) the C actions that follow each window frame
CHUNK_MASK = "chunk_mask"  # (B, W, C) bool, False past the episode end
# (B, W, K) float, standardised robot_obs dims (model.aux_robot_dims; with model.aux_goal the same dims at the
# span's end too, 2K): a training target only
AUX_TARGET = "aux_target"
TEXT = "text"  # (B, L) long, instruction token ids
TEXT_MASK = "text_mask"  # (B, L) long, 1 for real tokens
RAW_TEXT = "raw_text"  # list[str] of length B
DATA_SOURCE = "data_source"  # list[str] of length B, e.g. "calvin_action"

TENSOR_KEYS = (RGB, HAND_RGB, ACTION, ACTION_CHUNK, CHUNK_MASK, TEXT, TEXT_MASK)
