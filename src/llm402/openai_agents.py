"""The OpenAI Agents SDK on llm402: models paying through a `Gateway`, the cost of each model call and of a run
from run hooks, and typed refusals.

```python
from agents import Agent, Runner
from llm402.openai_agents import GatewayCostHooks, responses_model

hooks = GatewayCostHooks()
agent = Agent(name="judge", model=responses_model(gw, "sandbox/small"), tools=[...])
result = await Runner.run(agent, "...", hooks=hooks)
hooks.total_usd, [c.receipt.cost for c in hooks.calls]
```

The SDK calls ``RunHooks.on_llm_end`` in the context of the model call that just ended, where llm402 has set
``llm402.current_receipt``; `GatewayCostHooks` keeps that receipt for every model call of the run (``run`` and
``run_streamed`` alike). A refusal (a cap, the policy) reaches the caller as the SDK's ``openai.APIStatusError`` 402,
never retried (its ``x-should-retry: false`` is what the SDK's retry advice reads); ``llm402.errors_any.typed_error``
turns it into the llm402 error, and ``with llm402.errors_any.typed_errors():`` raises that instead.

Streamed usage: the Agents SDK asks a chat-completions stream for usage only from api.openai.com (or with
``ModelSettings(include_usage=True)``); llm402 removes the usage chunk it asked for when the SDK did not, so
``result.context_wrapper.usage`` of such a stream shows no tokens unless ``include_usage=True``, while the hooks'
receipts always carry tokens and cost. Responses streams carry their usage in ``response.completed`` as always.

``pip install "llm402[frameworks3]"`` (the Agents SDK needs openai 3.x).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agents import RunHooks

from .money import atomic_to_usd
from .receipts import Receipt, current_receipt

if TYPE_CHECKING:
    import openai
    from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
    from agents.models.openai_responses import OpenAIResponsesModel

    from .gateway import Gateway

__all__ = [
    "GatewayCostHooks",
    "ModelCallCost",
    "chat_completions_model",
    "openai_client",
    "responses_model",
]


@dataclass(frozen=True, slots=True)
class ModelCallCost:
    """One model call of a run: the agent that made it and llm402's receipt (``receipt.cost`` in micro-USDC)."""

    agent: str
    receipt: Receipt

    @property
    def cost_usd(self) -> Decimal:
        """The call's cost in USD."""
        return atomic_to_usd(self.receipt.cost)


class GatewayCostHooks(RunHooks[Any]):  # type: ignore[misc,unused-ignore]
    """``RunHooks`` that keep llm402's receipt of each model call: ``calls``, ``total`` (micro-USDC) and
    ``total_usd``. Give one instance to one run (``Runner.run(..., hooks=hooks)``); subclasses that override
    ``on_llm_start`` / ``on_llm_end`` call ``super()``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[ModelCallCost] = []
        self._before: dict[int, Receipt | None] = {}

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, input_items: Any) -> None:
        self._before[id(context)] = current_receipt.get()

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        before = self._before.pop(id(context), None)
        receipt = current_receipt.get()  # the hook runs in the model call's context: its receipt
        if receipt is not None and receipt is not before:
            self.calls.append(ModelCallCost(str(getattr(agent, "name", "")), receipt))

    @property
    def receipts(self) -> list[Receipt]:
        """The receipt of each model call, in order."""
        return [call.receipt for call in self.calls]

    @property
    def total(self) -> int:
        """What the run's model calls cost, in micro-USDC."""
        return sum(call.receipt.cost for call in self.calls)

    @property
    def total_usd(self) -> Decimal:
        """What the run's model calls cost, in USD."""
        return atomic_to_usd(self.total)


def openai_client(gateway: Gateway, **kwargs: Any) -> openai.AsyncOpenAI:
    """``openai.AsyncOpenAI`` on ``gateway.async_httpx2_client()`` (``kwargs`` go to the client, e.g.
    ``max_retries``); usable as ``agents.set_default_openai_client(...)`` too."""
    import openai

    http_client: Any = gateway.async_httpx2_client()  # openai 3.x takes httpx2 clients
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.api_key, http_client=http_client, **kwargs)


def responses_model(gateway: Gateway, model: str, **client_kwargs: Any) -> OpenAIResponsesModel:
    """The SDK's default kind of model (the Responses API) paying through ``gateway``."""
    from agents.models.openai_responses import OpenAIResponsesModel

    return OpenAIResponsesModel(model, openai_client(gateway, **client_kwargs))


def chat_completions_model(gateway: Gateway, model: str, **client_kwargs: Any) -> OpenAIChatCompletionsModel:
    """A chat-completions model paying through ``gateway``."""
    from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel

    return OpenAIChatCompletionsModel(model, openai_client(gateway, **client_kwargs))
