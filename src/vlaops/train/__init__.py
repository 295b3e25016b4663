"""Training: configuration (``vlaops.train.config``) and the Accelerate loop (``vlaops.train.loop``)."""
