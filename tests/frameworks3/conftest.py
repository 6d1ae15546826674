"""The frameworks built on openai 3.x (the OpenAI Agents SDK, PydanticAI) and the Anthropic SDK run in CI's second
environment (.ci/run: openai >= 3 on httpx2, ``.[dev,frameworks3]``); ``llama-index-llms-openai`` pins openai < 3,
so the main environment cannot hold them. There these tests are not collected at all, rather than skipped."""

from __future__ import annotations

import importlib.util

import openai

_NEEDED = ("agents", "pydantic_ai", "anthropic")
if not openai.__version__.startswith("3") or any(importlib.util.find_spec(name) is None for name in _NEEDED):
    collect_ignore_glob = ["test_*.py"]
