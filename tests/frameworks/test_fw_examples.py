"""The framework examples README.md points to run as written and their books agree (what the framework showed, the
receipts and what the sandbox charged, to the micro-USDC). The openai-3 ones run in tests/frameworks3."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_litellm_example_books_agree(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "litellm_completion.py"), run_name="__main__")
    assert "books agree" in capsys.readouterr().out
