# pragma version ~=0.4.3
"""
@title AgentPolicy
@license MIT
@notice What each llm402 agent (a wallet address) may spend, on which intents and which models.
        The owner writes; anyone reads. llm402's ContractPolicySource reads it and refreshes after a TTL, so a
        change written here takes effect at the agent's next refresh, without restarting it.
@dev Amounts are in minor units of the payment token (micro-USDC, 6 decimals). A cap of max_value(uint256)
     (UNLIMITED) means "no limit"; a cap of 0 means "nothing". Intents and models are stored as
     keccak256(UTF-8 name). An agent's allow-list admits only the listed hashes unless its any_intent / any_model
     flag is set: an empty list with the flag clear admits nothing (fail closed). An agent without a policy
     (never set, or revoked) is refused by llm402.
"""

UNLIMITED: constant(uint256) = max_value(uint256)
MAX_BATCH: constant(uint256) = 64


struct AgentLimits:
    configured: bool
    max_ticket_minor: uint256
    daily_cap_minor: uint256
    total_budget_minor: uint256
    any_intent: bool
    any_model: bool
    revision: uint256


event PolicySet:
    agent: indexed(address)
    max_ticket_minor: uint256
    daily_cap_minor: uint256
    total_budget_minor: uint256


event PolicyRevoked:
    agent: indexed(address)


event IntentChanged:
    agent: indexed(address)
    intent_hash: indexed(bytes32)
    allowed: bool


event ModelChanged:
    agent: indexed(address)
    model_hash: indexed(bytes32)
    allowed: bool


event AnyIntentChanged:
    agent: indexed(address)
    allowed: bool


event AnyModelChanged:
    agent: indexed(address)
    allowed: bool


event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)


owner: public(address)
_limits: HashMap[address, AgentLimits]
_intents: HashMap[address, HashMap[bytes32, bool]]
_models: HashMap[address, HashMap[bytes32, bool]]


@deploy
def __init__():
    self.owner = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)


@internal
def _only_owner():
    assert msg.sender == self.owner, "AgentPolicy: caller is not the owner"


@internal
def _touch(agent: address):
    # Every write bumps the agent's revision, so a reader can tell cheaply whether anything changed.
    self._limits[agent].revision += 1


# --- owner: writes ----------------------------------------------------------------------------------------------


@external
def set_policy(agent: address, max_ticket_minor: uint256, daily_cap_minor: uint256, total_budget_minor: uint256):
    """
    @notice Set an agent's caps (UNLIMITED = no limit, 0 = nothing). Allow-lists and flags are kept.
    """
    self._only_owner()
    assert agent != empty(address), "AgentPolicy: zero agent"
    self._limits[agent].configured = True
    self._limits[agent].max_ticket_minor = max_ticket_minor
    self._limits[agent].daily_cap_minor = daily_cap_minor
    self._limits[agent].total_budget_minor = total_budget_minor
    self._touch(agent)
    log PolicySet(
        agent=agent,
        max_ticket_minor=max_ticket_minor,
        daily_cap_minor=daily_cap_minor,
        total_budget_minor=total_budget_minor,
    )


@external
def revoke(agent: address):
    """
    @notice Kill switch: the agent has no policy any more, and llm402 refuses every call it makes.
    """
    self._only_owner()
    self._limits[agent].configured = False
    self._touch(agent)
    log PolicyRevoked(agent=agent)


@external
def allow_intent(agent: address, intent_hash: bytes32):
    self._only_owner()
    self._intents[agent][intent_hash] = True
    self._touch(agent)
    log IntentChanged(agent=agent, intent_hash=intent_hash, allowed=True)


@external
def disallow_intent(agent: address, intent_hash: bytes32):
    self._only_owner()
    self._intents[agent][intent_hash] = False
    self._touch(agent)
    log IntentChanged(agent=agent, intent_hash=intent_hash, allowed=False)


@external
def allow_model(agent: address, model_hash: bytes32):
    self._only_owner()
    self._models[agent][model_hash] = True
    self._touch(agent)
    log ModelChanged(agent=agent, model_hash=model_hash, allowed=True)


@external
def disallow_model(agent: address, model_hash: bytes32):
    self._only_owner()
    self._models[agent][model_hash] = False
    self._touch(agent)
    log ModelChanged(agent=agent, model_hash=model_hash, allowed=False)


@external
def set_any_intent(agent: address, allowed: bool):
    """
    @notice True: every intent is allowed (the list is ignored). False: only the listed intents.
    """
    self._only_owner()
    self._limits[agent].any_intent = allowed
    self._touch(agent)
    log AnyIntentChanged(agent=agent, allowed=allowed)


@external
def set_any_model(agent: address, allowed: bool):
    """
    @notice True: every model is allowed (the list is ignored). False: only the listed models.
    """
    self._only_owner()
    self._limits[agent].any_model = allowed
    self._touch(agent)
    log AnyModelChanged(agent=agent, allowed=allowed)


@external
def transfer_ownership(new_owner: address):
    self._only_owner()
    assert new_owner != empty(address), "AgentPolicy: zero owner"
    log OwnershipTransferred(previous_owner=self.owner, new_owner=new_owner)
    self.owner = new_owner


# --- views ----------------------------------------------------------------------------------------------------------


@view
@external
def policy_of(agent: address) -> AgentLimits:
    """
    @notice Everything but the allow-lists, in one call.
    """
    return self._limits[agent]


@view
@external
def has_policy(agent: address) -> bool:
    return self._limits[agent].configured


@view
@external
def max_ticket_minor(agent: address) -> uint256:
    return self._limits[agent].max_ticket_minor


@view
@external
def daily_cap_minor(agent: address) -> uint256:
    return self._limits[agent].daily_cap_minor


@view
@external
def total_budget_minor(agent: address) -> uint256:
    return self._limits[agent].total_budget_minor


@view
@external
def any_intent(agent: address) -> bool:
    return self._limits[agent].any_intent


@view
@external
def any_model(agent: address) -> bool:
    return self._limits[agent].any_model


@view
@external
def revision(agent: address) -> uint256:
    return self._limits[agent].revision


@view
@external
def intent_listed(agent: address, intent_hash: bytes32) -> bool:
    """
    @notice Whether this hash is on the agent's list (ignores the any_intent flag).
    """
    return self._intents[agent][intent_hash]


@view
@external
def model_listed(agent: address, model_hash: bytes32) -> bool:
    """
    @notice Whether this hash is on the agent's list (ignores the any_model flag).
    """
    return self._models[agent][model_hash]


@view
@external
def intent_allowed(agent: address, intent_hash: bytes32) -> bool:
    """
    @notice The effective answer: the agent has a policy, and any intent is allowed or this one is listed.
    """
    limits: AgentLimits = self._limits[agent]
    return limits.configured and (limits.any_intent or self._intents[agent][intent_hash])


@view
@external
def model_allowed(agent: address, model_hash: bytes32) -> bool:
    """
    @notice The effective answer: the agent has a policy, and any model is allowed or this one is listed.
    """
    limits: AgentLimits = self._limits[agent]
    return limits.configured and (limits.any_model or self._models[agent][model_hash])


@view
@external
def intents_listed(agent: address, hashes: DynArray[bytes32, MAX_BATCH]) -> DynArray[bool, MAX_BATCH]:
    """
    @notice intent_listed for up to 64 hashes in one call.
    """
    result: DynArray[bool, MAX_BATCH] = []
    for h: bytes32 in hashes:
        result.append(self._intents[agent][h])
    return result


@view
@external
def models_listed(agent: address, hashes: DynArray[bytes32, MAX_BATCH]) -> DynArray[bool, MAX_BATCH]:
    """
    @notice model_listed for up to 64 hashes in one call.
    """
    result: DynArray[bool, MAX_BATCH] = []
    for h: bytes32 in hashes:
        result.append(self._models[agent][h])
    return result
