"""Routes (a gateway and a model), their capability facts, and what a request needs from them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..pricing import ModelPrice, estimate_prompt_tokens, max_completion_tokens

if TYPE_CHECKING:
    from ..gateway import Gateway

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


@dataclass(frozen=True, slots=True)
class Route:
    """One way to answer a call: ``model`` on ``gateway``.

    ``tools``, ``vision`` and ``context_length`` state capability facts; ``None`` leaves them to the gateway's
    catalog (``Router.load_prices``), and a fact nobody states is unknown. ``headers`` are added to every request
    sent on this route (kept out of the repr: they may hold secrets).
    """

    gateway: Gateway
    model: str
    name: str = ""
    tools: bool | None = None
    vision: bool | None = None
    context_length: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a route needs a model")
        if not self.name:
            object.__setattr__(self, "name", f"{self.model}@{urlsplit(self.gateway.base_url).netloc}")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a gateway's ``/models`` listing says a model can do (``None``: it does not say)."""

    tools: bool | None = None
    vision: bool | None = None


@dataclass(frozen=True, slots=True)
class RouteFacts:
    """A route's facts as the router uses them: stated on the route first, then from the catalog."""

    tools: bool | None
    vision: bool | None
    context_length: int | None
    price: ModelPrice | None


@dataclass(frozen=True, slots=True)
class Needs:
    """What a request asks of a route: tool calling, image input, and room for its tokens (an upper bound)."""

    tools: bool = False
    vision: bool = False
    tokens: int = 0

    @classmethod
    def of(cls, body: Mapping[str, Any] | None) -> Needs:
        """Read the needs of a JSON request body."""
        if body is None:
            return cls()
        tools = bool(body.get("tools") or body.get("functions"))
        messages = body.get("messages")
        vision = isinstance(messages, list) and any(
            isinstance(m, Mapping) and _has_image(m.get("content")) for m in messages
        )
        tokens = estimate_prompt_tokens(body) + max_completion_tokens(body) if isinstance(messages, list) else 0
        return cls(tools, vision, tokens)

    def excludes(self, facts: RouteFacts) -> bool:
        """A route known to lack a needed capability (it would fail, or worse, silently drop the images)."""
        return (self.tools and facts.tools is False) or (self.vision and facts.vision is False)

    def unsure(self, facts: RouteFacts) -> bool:
        """A needed capability the route's facts do not state (tried after the routes known to have it)."""
        return (self.tools and facts.tools is None) or (self.vision and facts.vision is None)

    def too_long(self, facts: RouteFacts) -> bool:
        """The request's token bound exceeds the route's known context length (tried last, not dropped: the bound
        counts one token per byte, so the request may still fit)."""
        return facts.context_length is not None and self.tokens > facts.context_length


def _has_image(content: Any) -> bool:
    if not isinstance(content, list):
        return False
    return any(isinstance(p, Mapping) and (p.get("type") in _IMAGE_PARTS or "image_url" in p) for p in content)


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _entry_capabilities(entry: Mapping[str, Any]) -> Capabilities:
    tools: bool | None = None
    vision: bool | None = None
    architecture = entry.get("architecture")  # OpenRouter
    if isinstance(architecture, Mapping):
        modalities = architecture.get("input_modalities")
        if isinstance(modalities, list):
            vision = "image" in modalities
        elif isinstance(architecture.get("modality"), str):
            vision = "image" in architecture["modality"].split("->", 1)[0]
    supported = entry.get("supported_parameters")  # OpenRouter
    if isinstance(supported, list):
        tools = "tools" in supported
    caps = entry.get("capabilities")
    if isinstance(caps, Mapping):
        vision = _flag(caps.get("vision")) if vision is None else vision
        found = _flag(caps.get("tools", caps.get("function_calling", caps.get("tool_calling"))))
        tools = found if tools is None else tools
    elif isinstance(caps, list):
        names = {str(c).lower() for c in caps}
        vision = ("vision" in names or "image" in names) if vision is None else vision
        tools = bool(names & {"tools", "function_calling", "tool_calling"}) if tools is None else tools
    if vision is None:
        vision = _flag(entry.get("supports_vision"))
    if tools is None:
        tools = _flag(entry.get("supports_function_calling", entry.get("supports_tools")))
    return Capabilities(tools, vision)


def capabilities_from_listing(body: bytes | Mapping[str, Any]) -> dict[str, Capabilities]:
    """Capability facts from a ``/models`` listing, in the shapes gateways use: OpenRouter's ``architecture`` and
    ``supported_parameters``, a ``capabilities`` object or list, LiteLLM's ``supports_*`` flags. Models the listing
    says nothing about are left out."""
    try:
        data: Any = json.loads(body) if isinstance(body, bytes) else body
    except ValueError:
        return {}
    entries = data.get("data") if isinstance(data, Mapping) else None
    found: dict[str, Capabilities] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
            caps = _entry_capabilities(entry)
            if caps != Capabilities():
                found[entry["id"]] = caps
    return found


def lookup_capabilities(table: Mapping[str, Capabilities], model: str) -> Capabilities:
    """``provider/model`` and bare ``model`` names match each other (as in `PriceCatalog.lookup`)."""
    if model in table:
        return table[model]
    bare = model.split("/", 1)[-1]
    for name, caps in table.items():
        if name.split("/", 1)[-1] == bare:
            return caps
    return Capabilities()
