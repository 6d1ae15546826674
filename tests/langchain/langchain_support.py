"""Helpers for the LangChain tests: what the sandbox itself says about a wallet."""

from sandbox_view import FUNDS, SandboxView

__all__ = ["FUNDS", "SandboxView"]
