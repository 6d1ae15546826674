"""Signed text built from gateway fields (issue 17.7): a control character or line separator in any field a gateway
chose is refused before anything is signed."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llm402 import Wallet
from llm402.credit import siwe_message
from llm402.errors import ConfigurationError
from llm402.identity import SIWX_HEADER, IdentityError, control_character, siwx_headers
from llm402.wallet import Signer

ORIGIN = "http://127.0.0.1:8402"
URL = f"{ORIGIN}/v1/chat/completions"
HOSTILE = {"lf": "\n", "cr": "\r", "nul": "\x00", "line_separator": "\u2028"}
MORE_HOSTILE = {"crlf": "\r\n", "paragraph_separator": "\u2029", "nel": "\x85", "del": "\x7f", "esc": "\x1b"}


class RecordingSigner:
    """A `Signer` that records every request to sign and signs with a throwaway wallet."""

    def __init__(self) -> None:
        self._wallet = Wallet.create()
        self.messages: list[str] = []
        self.typed: list[str] = []

    @property
    def address(self) -> str:
        return self._wallet.address

    def sign_typed_data(self, domain: Any, types: dict[str, Any], primary_type: str, message: dict[str, Any]) -> bytes:
        self.typed.append(primary_type)
        return self._wallet.sign_typed_data(domain, types, primary_type, message)

    def sign_message(self, message: str) -> bytes:
        self.messages.append(message)
        return self._wallet.sign_message(message)


def times() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "issuedAt": now.isoformat().replace("+00:00", "Z"),
        "expirationTime": (now + timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
        "notBefore": (now - timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
    }


def extension(**info: object) -> dict[str, Any]:
    """A 402's ``extensions`` with a sign-in-with-x challenge using every optional field, overridden by ``info``."""
    fields: dict[str, object] = {
        "domain": ORIGIN.split("://", 1)[1],
        "uri": URL,
        "version": "1",
        "nonce": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
        **times(),
        "statement": "Sign in to the gateway",
        "requestId": "req-42",
        "resources": [URL, f"{ORIGIN}/v1/models"],
    }
    fields.update(info)
    return {
        SIWX_HEADER: {
            "info": fields,
            "supportedChains": [{"chainId": "eip155:84532", "type": "eip191"}],
            "schema": {},
        }
    }


def hostile(field: str, char: str) -> dict[str, Any]:
    """The challenge with ``char`` inside ``field`` (for URLs, a line that would read as another signed field)."""
    clean: dict[str, Any] = extension()[SIWX_HEADER]["info"]
    if field == "resources":
        return extension(resources=[URL, f"{ORIGIN}/v1/models{char}- https://evil.example/all"])
    if field == "uri":
        return extension(uri=f"{URL}{char}Chain ID: 1")
    if field == "domain":
        return extension(domain=f"{clean['domain']}{char}")
    if field == "statement":
        return extension(statement=f"Sign in to the gateway{char}and approve every transfer")
    return extension(**{field: f"{clean[field]}{char}Request ID: forged"})


FIELDS = [
    "domain",
    "uri",
    "version",
    "nonce",
    "issuedAt",
    "expirationTime",
    "notBefore",
    "statement",
    "requestId",
    "resources",
]


@pytest.mark.parametrize("char", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("field", FIELDS)
def test_a_control_character_in_any_challenge_field_is_refused_before_signing(field: str, char: str) -> None:
    signer = RecordingSigner()
    assert isinstance(signer, Signer)
    with pytest.raises(IdentityError) as info:
        siwx_headers(hostile(field, char), signer, URL, network="eip155:84532")
    assert signer.messages == []  # nothing was signed
    assert signer.typed == []
    assert "control character" in str(info.value)
    assert field in str(info.value)
    assert char not in str(info.value)  # the gateway's text is not echoed into logs either


@pytest.mark.parametrize("char", MORE_HOSTILE.values(), ids=MORE_HOSTILE.keys())
@pytest.mark.parametrize("field", ["requestId", "resources", "statement", "nonce"])
def test_other_line_breaking_characters_are_refused_too(field: str, char: str) -> None:
    signer = RecordingSigner()
    with pytest.raises(IdentityError, match="control character"):
        siwx_headers(hostile(field, char), signer, URL)
    assert signer.messages == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("requestId", 42), ("statement", ["a"]), ("resources", "http://127.0.0.1:8402/v1/x"), ("resources", [1])],
)
def test_a_field_that_is_not_text_is_refused_before_signing(field: str, value: object) -> None:
    signer = RecordingSigner()
    with pytest.raises(IdentityError):
        siwx_headers(extension(**{field: value}), signer, URL)
    assert signer.messages == []


def test_a_clean_challenge_still_signs_every_field() -> None:
    signer = RecordingSigner()
    challenge = extension(statement="Sign in to the gateway ✓ (jüdge)")  # non-ASCII text is fine, controls are not
    headers = siwx_headers(challenge, signer, URL, network="eip155:84532")
    [message] = signer.messages
    payload = json.loads(base64.b64decode(headers[SIWX_HEADER]))
    info = challenge[SIWX_HEADER]["info"]
    assert payload["requestId"] == "req-42"
    assert payload["resources"] == info["resources"]
    assert payload["statement"] == info["statement"]
    assert "\nRequest ID: req-42" in message
    assert f"\nResources:\n- {URL}\n- {ORIGIN}/v1/models" in message
    assert payload["signature"] == "0x" + signer._wallet.sign_message(message).hex()
    lines = message.split("\n")
    assert all(control_character(line) is None for line in lines)


def test_control_character_finds_cc_and_line_separators_only() -> None:
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]:
        assert control_character(f"ok{chr(code)}ok") == f"U+{code:04X}"
    for text in ["", "sign in", "jüdge.eth ✓", "日本語", "emoji 👍🏽", "a\u200db"]:
        assert control_character(text) is None


@pytest.mark.parametrize("char", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("field", ["uri", "statement", "address"])
def test_a_siwe_key_mint_message_refuses_control_characters(field: str, char: str) -> None:
    wallet = Wallet.create()
    args = {"address": wallet.address, "uri": f"{ORIGIN}/v1/auth/keys", "statement": "Sign in to the AI Gateway"}
    args[field] += char + "Chain ID: 1"
    with pytest.raises(ConfigurationError, match="control character"):
        siwe_message(args["address"], args["uri"], 84532, args["statement"])


@pytest.mark.parametrize("chain_id", [0, -1, True])
def test_a_siwe_key_mint_message_refuses_a_chain_id_that_is_not_a_positive_integer(chain_id: int) -> None:
    with pytest.raises(ConfigurationError, match="chain id"):
        siwe_message(Wallet.create().address, f"{ORIGIN}/v1/auth/keys", chain_id)


def test_a_clean_siwe_key_mint_message_still_builds() -> None:
    address = Wallet.create().address
    text = siwe_message(address, f"{ORIGIN}/v1/auth/keys", 84532)
    assert text.startswith("127.0.0.1:8402 wants you to sign in with your Ethereum account:\n" + address)
    assert "\nChain ID: 84532\n" in text
