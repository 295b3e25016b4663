"""Training: configuration (``vlaops.train.config``), which parts train (``vlaops.train.setup``), the
Accelerate loop (``vlaops.train.loop``) and its checkpoints (``vlaops.train.checkpoint``), which hold the
trainable state only (``vlaops.train.trainable``), what a launcher asks for (``vlaops.train.launch``) and
``vlaops export`` of a checkpoint (``vlaops.train.export``)."""
