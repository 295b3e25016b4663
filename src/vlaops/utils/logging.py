"""One logger for the whole project, quiet on every rank but zero.

After lightning-hydra-template's ``RankedLogger``: under Accelerate several processes run the same
code, and a log line per process is noise.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_rank_zero() -> bool:
    """The main process of a distributed run (or the only process): the one that writes shared files."""
    return _rank() == 0


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0 or record.levelno >= logging.ERROR


def get_logger(name: str) -> logging.Logger:
    """Return the project logger ``name``; only rank zero prints below ERROR."""
    root = logging.getLogger("vlaops")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("VLAOPS_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("vlaops") else f"vlaops.{name}")
