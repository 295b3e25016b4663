"""Training: configuration (``vlaops.train.config``), which parts train (``vlaops.train.setup``), the
Accelerate loop (``vlaops.train.loop``) and its checkpoints (``vlaops.train.checkpoint``)."""
