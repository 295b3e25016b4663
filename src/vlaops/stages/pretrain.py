"""pretrain: rendered scenes with grounded captions -> models/pretrained, the tiny Kosmos-2 fine-tuning starts from."""

from vlaops import tracking
from vlaops.config import Config
from vlaops.pretrain.run import pretrain_tracked
from vlaops.utils.executor import connect
from vlaops.utils.paths import check_outputs


def run(cfg: Config) -> None:
    check_outputs(cfg, "pretrain")
    tracking.check_store(cfg.tracking)
    connect(cfg.compute)  # compute.executor=ray: its cluster reachable before any scene is rendered
    pretrain_tracked(cfg)
