"""One thin module per DVC stage: read the config, call the library, write the outputs.

Each exposes ``run(cfg: Config) -> None``; ``vlaops.cli`` calls it for ``dvc repro`` and the shell.
"""
