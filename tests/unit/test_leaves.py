"""Money, policy files, pricing and the usage meter: the leaves the core stands on."""

from __future__ import annotations

import gzip
import json
import pickle
from decimal import Decimal
from pathlib import Path

import pytest

from llm402 import Policy, Wallet
from llm402.errors import ConfigurationError, PolicyRefusal, WalletError
from llm402.metering import UsageMeter
from llm402.money import format_usd, parse_atomic, usd_to_atomic
from llm402.pricing import ModelPrice, PriceCatalog, estimate_cost, estimate_prompt_tokens


def test_money_is_exact_integers() -> None:
    assert usd_to_atomic("0.05") == 50_000
    assert usd_to_atomic(Decimal("1")) == 1_000_000
    assert format_usd(1_234_567) == "$1.234567"
    with pytest.raises(TypeError):
        usd_to_atomic(0.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        usd_to_atomic("0.0000001")
    with pytest.raises(ValueError):
        usd_to_atomic("-1")


@pytest.mark.parametrize("bad", ["-5", "1.5", "0", "", "abc", str(2**256), "١٢", True, None, 3.0])
def test_wire_amounts_are_strict(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_atomic(bad)


def test_policy_file_errors_name_the_field(tmp_path: Path) -> None:
    good = tmp_path / "policy.toml"
    good.write_text('max_payment_usd = "0.05"\ndaily_cap_usd = "5"\nallowed_intents = ["judging"]\n')
    policy = Policy.from_file(good)
    assert policy.max_payment == 50_000
    assert policy.daily_cap == 5_000_000
    bad = tmp_path / "bad.toml"
    bad.write_text('daily_cap_usd = "-3"\n')
    with pytest.raises(ConfigurationError, match="daily_cap_usd"):
        Policy.from_file(bad)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"max_paymnt_usd": "1"}))
    with pytest.raises(ConfigurationError, match="max_paymnt_usd"):
        Policy.from_file(typo)
    (tmp_path / "broken.toml").write_text("= nope")
    with pytest.raises(ConfigurationError, match="not valid"):
        Policy.from_file(tmp_path / "broken.toml")


def test_policy_models_by_intent() -> None:
    policy = Policy(allowed_intents=frozenset({"judging"}), models_by_intent={"judging": frozenset({"a"})})
    policy.check_call("judging", "a")
    with pytest.raises(PolicyRefusal) as info:
        policy.check_call("judging", "b")
    assert info.value.code == "model_not_allowed"
    with pytest.raises(PolicyRefusal) as info:
        policy.check_call("other", "a")
    assert info.value.code == "intent_not_allowed"


def test_prices_and_conservative_estimate() -> None:
    catalog = PriceCatalog.from_models_response(
        json.dumps(
            {
                "data": [
                    {"id": "gemini/gemini-2.5-flash", "promptPricePer1MTokens": 0.15, "completionPricePer1M": 0.6},
                    {"id": "no-price"},
                ]
            }
        ).encode()
    )
    price = catalog.lookup("gemini-2.5-flash")
    assert price == ModelPrice(150_000, 600_000)
    assert catalog.lookup("no-price") is None
    body = {"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 100}
    assert estimate_prompt_tokens(body) >= 2
    assert estimate_cost(price, body) == price.cost(estimate_prompt_tokens(body), 100)
    assert ModelPrice(1, 1).cost(1, 0) == 1  # rounds up to the next micro-USDC


SSE = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("split", range(len(SSE) + 1))
def test_meter_reads_usage_at_every_split(split: int) -> None:
    meter = UsageMeter(streaming=True)
    out = meter.feed(SSE[:split]) + meter.feed(SSE[split:]) + meter.finish()
    assert out == SSE
    assert meter.usage is not None
    assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (7, 2)
    assert meter.done


@pytest.mark.parametrize("split", [0, 1, 10, 57, 100, len(SSE)])
def test_meter_strips_the_usage_event_it_asked_for(split: int) -> None:
    meter = UsageMeter(streaming=True, strip_usage_event=True)
    out = meter.feed(SSE[:split]) + meter.feed(SSE[split:]) + meter.finish()
    assert b"usage" not in out
    assert b"[DONE]" in out
    assert meter.usage is not None
    assert meter.usage.completion_tokens == 2


def test_meter_reads_gzip() -> None:
    packed = gzip.compress(SSE)
    meter = UsageMeter(streaming=True, content_encoding="gzip")
    out = b"".join(meter.feed(packed[i : i + 7]) for i in range(0, len(packed), 7)) + meter.finish()
    assert out == packed
    assert meter.usage is not None
    assert meter.usage.prompt_tokens == 7


def test_wallet_is_redacted() -> None:
    wallet = Wallet.create()
    key = wallet.export_private_key()
    assert key[2:] not in repr(wallet) + str(wallet)
    with pytest.raises(WalletError) as info:
        Wallet.from_key("0x1234")
    assert "1234" not in str(info.value)
    with pytest.raises(WalletError):
        pickle.dumps(wallet)
    env_wallet = Wallet.from_env({"LLM402_PRIVATE_KEY": key})
    assert env_wallet.address == wallet.address
    with pytest.raises(WalletError) as info:
        Wallet.from_env({"LLM402_PRIVATE_KEY": key[:-2] + "zz"})
    assert key[2:10] not in str(info.value)


def test_keystore_round_trip(tmp_path: Path) -> None:
    wallet = Wallet.create()
    path = tmp_path / "key.json"
    path.write_text(json.dumps(wallet.encrypt("pw")))
    loaded = Wallet.from_env({"LLM402_KEYSTORE": str(path), "LLM402_KEYSTORE_PASSWORD": "pw"})
    assert loaded.address == wallet.address
    with pytest.raises(WalletError, match="wrong password"):
        Wallet.from_keystore(path, "nope")


def test_fast_eip3009_signatures_equal_eth_account() -> None:
    import random

    from eth_account import Account

    rng = random.Random(3009)
    wallet = Wallet.create()
    account = Account.from_key(wallet.export_private_key())
    fields = [
        ("from", "address"),
        ("to", "address"),
        ("value", "uint256"),
        ("validAfter", "uint256"),
        ("validBefore", "uint256"),
        ("nonce", "bytes32"),
    ]
    types = {"TransferWithAuthorization": [{"name": n, "type": t} for n, t in fields]}
    for _ in range(50):
        domain = {
            "name": rng.choice(["USDC", "USD Coin"]),
            "version": "2",
            "chainId": rng.choice([1, 8453, 84532]),
            "verifyingContract": "0x" + bytes(rng.randrange(256) for _ in range(20)).hex(),
        }
        message = {
            "from": wallet.address,
            "to": "0x" + bytes(rng.randrange(256) for _ in range(20)).hex(),
            "value": str(rng.randrange(1, 2**96)),
            "validAfter": "0",
            "validBefore": str(rng.randrange(2**40)),
            "nonce": "0x" + bytes(rng.randrange(256) for _ in range(32)).hex(),
        }
        expected = account.sign_typed_data(domain_data=domain, message_types=types, message_data=message)
        assert wallet.sign_typed_data(domain, types, "TransferWithAuthorization", message) == bytes(expected.signature)


def test_fast_permit2_upto_signatures_equal_eth_account() -> None:
    import random

    from eth_account import Account

    rng = random.Random(2)
    wallet = Wallet.create()
    account = Account.from_key(wallet.export_private_key())

    def address() -> str:
        return "0x" + bytes(rng.randrange(256) for _ in range(20)).hex()

    types = {
        "PermitWitnessTransferFrom": [
            {"name": "permitted", "type": "TokenPermissions"},
            {"name": "spender", "type": "address"},
            {"name": "nonce", "type": "uint256"},
            {"name": "deadline", "type": "uint256"},
            {"name": "witness", "type": "Witness"},
        ],
        "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
        "Witness": [
            {"name": "to", "type": "address"},
            {"name": "facilitator", "type": "address"},
            {"name": "validAfter", "type": "uint256"},
        ],
    }
    for _ in range(50):
        domain = {"name": "Permit2", "chainId": rng.choice([1, 8453, 84532]), "verifyingContract": address()}
        message = {
            "permitted": {"token": address(), "amount": rng.randrange(2**128)},
            "spender": address(),
            "nonce": rng.randrange(2**256),
            "deadline": rng.randrange(2**40),
            "witness": {"to": address(), "facilitator": address(), "validAfter": 0},
        }
        expected = account.sign_typed_data(domain_data=domain, message_types=types, message_data=message)
        assert wallet.sign_typed_data(domain, types, "PermitWitnessTransferFrom", message) == bytes(expected.signature)


def test_typed_data_the_fast_digest_does_not_write_goes_to_eth_account() -> None:
    from eth_account import Account

    wallet = Wallet.create()
    account = Account.from_key(wallet.export_private_key())
    domain = {"name": "Mail", "version": "1", "chainId": 1, "verifyingContract": "0x" + "cc" * 20}
    types = {
        "Mail": [
            {"name": "to", "type": "address[]"},
            {"name": "body", "type": "string"},
            {"name": "ok", "type": "bool"},
        ]
    }
    message = {"to": ["0x" + "aa" * 20, "0x" + "bb" * 20], "body": "hi", "ok": True}
    expected = account.sign_typed_data(domain_data=domain, message_types=types, message_data=message)
    assert wallet.sign_typed_data(domain, types, "Mail", message) == bytes(expected.signature)
    flat = {"Mail": [{"name": "body", "type": "string"}, {"name": "ok", "type": "bool"}]}
    expected = account.sign_typed_data(domain_data=domain, message_types=flat, message_data={"body": "hi", "ok": False})
    assert wallet.sign_typed_data(domain, flat, "Mail", {"body": "hi", "ok": False}) == bytes(expected.signature)
    with pytest.raises(WalletError):
        wallet.sign_typed_data(domain, {"Mail": [{"name": "n", "type": "uint256"}]}, "Mail", {"n": -1})


def test_topup_body_writes_usd_exactly() -> None:
    from llm402.credit import topup_body

    assert topup_body(1_000_000) == b'{"amount":1}'
    assert topup_body(1_234_567) == b'{"amount":1.234567}'
    assert json.loads(topup_body(10_000_000_000)) == {"amount": 10000}
