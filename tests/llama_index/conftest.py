"""LlamaIndex tests use the shared fixtures of tests/conftest.py (sandbox, view, wallet); this re-exports the
sandbox view for the test modules that import it from here."""

from __future__ import annotations

from sandbox_view import FUNDS, SandboxView

__all__ = ["FUNDS", "SandboxView"]
