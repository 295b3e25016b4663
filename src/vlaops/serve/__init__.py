"""Serving an exported policy: ``vlaops serve`` (FastAPI + uvicorn, ``app``), its sessions, the image
wire format (``codec``) and the Python client.

Names resolve lazily, as in ``vlaops.model``: the client needs neither FastAPI nor torch, and the config
(imported by every command) nothing at all.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeConfig": "config",
    "decode_image": "codec",
    "encode_image": "codec",
    "SessionStore": "sessions",
    "UnknownSession": "sessions",
    "PolicyServer": "app",
    "create_app": "app",
    "running_server": "app",
    "serve": "app",
    "PolicyClient": "client",
    "ServeError": "client",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlaops.serve.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlaops.serve' has no attribute {name!r}")
