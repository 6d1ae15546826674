"""Framework tests on the main environment (openai 2.x): LangChain v1 agents, LlamaIndex agents, LiteLLM."""

from __future__ import annotations

import os

# LiteLLM fetches its model price map from the network at import unless told to use the copy it ships.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
