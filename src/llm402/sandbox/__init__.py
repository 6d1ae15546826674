"""The llm402 sandbox: a local reference gateway for development, demos and tests (never for production).

It speaks the Token Kiosk API (SIWE-minted ``sk-`` keys, x402 top-up, reserved-then-reconciled credit), per-call
x402 in three dialects (v2, v1, the Token Kiosk body), verifies EIP-3009 signatures for real against its own ledger
of test USDC (with a faucet), answers with scripted deterministic models, and injects faults on request.

    from llm402.sandbox import SandboxConfig, SandboxServer
    with SandboxServer(SandboxConfig(db_path=":memory:")) as sb:
        print(sb.url)
"""

from __future__ import annotations

from .app import create_app
from .config import DEFAULT_MODELS, ModelSpec, SandboxConfig
from .server import SandboxServer, serve

__all__ = ["DEFAULT_MODELS", "ModelSpec", "SandboxConfig", "SandboxServer", "create_app", "serve"]
