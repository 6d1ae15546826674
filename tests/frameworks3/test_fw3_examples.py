"""The openai-3 framework examples README.md points to (OpenAI Agents SDK, PydanticAI, Anthropic SDK) run as written
and their books agree: what the framework showed, the receipts and what the sandbox charged, to the micro-USDC."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["openai_agents_run.py", "pydantic_ai_agent.py", "anthropic_messages.py"])
def test_example_books_agree(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert "books agree" in capsys.readouterr().out
