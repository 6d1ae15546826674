"""Hypothesis profiles: ``ci`` (the default, at least 2,000 examples per parser) and ``slow`` (20,000).

Pick one with ``LLM402_FUZZ_PROFILE=slow pytest tests/fuzz``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("slow", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LLM402_FUZZ_PROFILE", "ci"))
