"""`idlm serve`: the OpenAI-compatible HTTP server (``idlm.server.serve``)."""

from __future__ import annotations

from ..config import ServerConfig


def cmd_serve(cfg: ServerConfig) -> int:
    from ..server.serve import serve

    return serve(cfg)
