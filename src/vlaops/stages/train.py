"""train: CALVIN training split + normaliser -> models/policy (Kosmos-2 + LSTM), tracked in MLflow."""

from vlaops import tracking
from vlaops.config import Config
from vlaops.train.launch import check_launch
from vlaops.train.trainer import train
from vlaops.utils.paths import check_input_dir, check_outputs


def run(cfg: Config) -> None:
    # fail fast: where it writes, the store, the launcher's settings and the inputs, before any model is built
    check_outputs(cfg, "train")
    tracking.check_store(cfg.tracking)
    check_launch(cfg.train)  # what accelerate launch asks for (precision, FSDP, DeepSpeed) against the recipe
    check_input_dir("data.calvin_dir", cfg.data.calvin_dir)
    check_input_dir("data.normalized_dir", cfg.data.normalized_dir)
    train(cfg)
