"""evaluate: models/policy -> reports/metrics.json (chain success in the simulator + offline action error).

``paths.model_dir`` is an export directory or a registered model (``models:/<name>/<version>``,
downloaded from the tracking store for the run); ``vlaops.eval.evaluate`` plays the chains and writes
the reports onto the MLflow run that trained the policy.
"""

from vlaops import tracking
from vlaops.config import Config
from vlaops.eval.evaluate import evaluate
from vlaops.utils.executor import connect
from vlaops.utils.paths import check_outputs


def run(cfg: Config) -> None:
    check_outputs(cfg, "evaluate")  # before a single chain is played
    tracking.check_store(cfg.tracking)
    connect(cfg.compute)  # compute.executor=ray: Ray installed and its cluster reachable
    with tracking.policy_dir(cfg.tracking, cfg.paths.model_dir) as model_dir:
        evaluate(cfg, model_dir)
