"""An in-process Ethereum chain (eth-tester on py-evm) with AgentPolicy and a minimal ENS deployed on it.

web3's ENS module resolves through the ENS universal resolver at a fixed address; the chain's genesis state puts the
test universal resolver's code there, so ``w3.ens`` resolves names, reverse records and text records for real.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vyper
from ens import ENS
from ens.constants import UNIVERSAL_RESOLVER_ADDR
from ens.utils import raw_name_to_hash
from eth_tester import EthereumTester, PyEVMBackend
from eth_utils import keccak, to_canonical_address
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract

from llm402.policy_sources import agent_policy_source_code, name_hash

CONTRACTS = Path(__file__).parent / "contracts"
ROOT = b"\x00" * 32
UNLIMITED = 2**256 - 1


@dataclass(frozen=True)
class Compiled:
    abi: list[dict[str, Any]]
    bytecode: str
    runtime: str


def compile_vyper(source: str) -> Compiled:
    out = vyper.compile_code(source, output_formats=["abi", "bytecode", "bytecode_runtime"])
    return Compiled(out["abi"], out["bytecode"], out["bytecode_runtime"])


def compile_all() -> dict[str, Compiled]:
    """Every contract the on-chain tests deploy, compiled once per session."""
    compiled = {path.stem: compile_vyper(path.read_text()) for path in sorted(CONTRACTS.glob("*.vy"))}
    compiled["AgentPolicy"] = compile_vyper(agent_policy_source_code())
    return compiled


class Chain:
    """The test chain: an owner account, AgentPolicy, and ENS (registry, public resolver, universal resolver)."""

    def __init__(self, compiled: dict[str, Compiled]) -> None:
        state = PyEVMBackend.generate_genesis_state(num_accounts=4)
        universal = compiled["UniversalResolver"]
        state[to_canonical_address(UNIVERSAL_RESOLVER_ADDR)] = {
            "balance": 0,
            "nonce": 1,
            "code": bytes.fromhex(universal.runtime.removeprefix("0x")),
            "storage": {},
        }
        self.w3 = Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend(genesis_state=state))))
        self.owner = self.w3.eth.accounts[0]
        self.stranger = self.w3.eth.accounts[1]
        self.w3.eth.default_account = self.owner
        self.registry = self.deploy(compiled["ENSRegistry"])
        self.resolver = self.deploy(compiled["PublicResolver"], self.registry.address)
        self.w3.eth.contract(address=UNIVERSAL_RESOLVER_ADDR, abi=universal.abi).functions.set_registry(
            self.registry.address
        ).transact()
        self.w3.ens = ENS.from_web3(self.w3, addr=self.registry.address)
        self.policy = self.deploy(compiled["AgentPolicy"])

    def deploy(self, compiled: Compiled, *args: Any) -> Contract:
        factory = self.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
        receipt = self.w3.eth.wait_for_transaction_receipt(factory.constructor(*args).transact())
        return self.w3.eth.contract(address=receipt["contractAddress"], abi=compiled.abi)

    # --- ENS -------------------------------------------------------------------------------------------------------
    def _claim(self, name: str) -> bytes:
        """Own every node of ``name`` (as the root owner) and give it the public resolver; return its node."""
        parent = ROOT
        for label in reversed(name.split(".")):
            self.registry.functions.setSubnodeOwner(parent, keccak(text=label), self.owner).transact()
            parent = keccak(parent + keccak(text=label))
        node = raw_name_to_hash(name)
        assert node == parent
        self.registry.functions.setResolver(node, self.resolver.address).transact()
        return node

    def set_address(self, name: str, address: str) -> None:
        self.resolver.functions.setAddr(self._claim(name), address).transact()

    def set_reverse(self, address: str, name: str) -> None:
        node = self._claim(f"{address.lower().removeprefix('0x')}.addr.reverse")
        self.resolver.functions.setName(node, name).transact()

    def register(self, name: str, address: str, *, reverse: bool = True) -> None:
        """``name`` -> ``address``, and (``reverse``) ``address``'s primary name -> ``name``."""
        self.set_address(name, address)
        if reverse:
            self.set_reverse(address, name)

    def set_text(self, name: str, key: str, value: str) -> None:
        self.resolver.functions.setText(raw_name_to_hash(name), key, value).transact()

    # --- AgentPolicy -----------------------------------------------------------------------------------------------
    def set_policy(
        self,
        agent: str,
        *,
        ticket: int = UNLIMITED,
        daily: int = UNLIMITED,
        total: int = UNLIMITED,
        intents: tuple[str, ...] = (),
        models: tuple[str, ...] = (),
        any_intent: bool = False,
        any_model: bool = False,
    ) -> None:
        fns = self.policy.functions
        fns.set_policy(agent, ticket, daily, total).transact()
        for intent in intents:
            fns.allow_intent(agent, name_hash(intent)).transact()
        for model in models:
            fns.allow_model(agent, name_hash(model)).transact()
        fns.set_any_intent(agent, any_intent).transact()
        fns.set_any_model(agent, any_model).transact()


class Traffic:
    """Requests that left through an httpx transport (i.e. reached a socket), but the tests' own questions to the
    sandbox's control endpoints (``/sandbox/...``)."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    @property
    def count(self) -> int:
        return sum(1 for r in self.requests if " /sandbox/" not in r)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
