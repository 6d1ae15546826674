"""Minted API keys on disk and in the environment (issue 16.10): mode 0600, never through a link, never a bad token."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from llm402.credit import API_KEY_MAX_LENGTH, load_key, store_key, validate_api_key
from llm402.errors import ConfigurationError, PaymentRequiredError

KEY = "sk-kiosk-" + "a1B2c3D4" * 5
BAD_KEYS = {
    "lf": "sk-good\nx-evil: 1",
    "crlf": "sk-good\r\nx-evil: 1",
    "cr": "sk-good\rmore",
    "nul": "sk-good\x00more",
    "tab": "sk-good\tmore",
    "del": "sk-good\x7fmore",
    "space": "sk-good more",
    "non_ascii": "sk-gööd",
    "line_separator": "sk-good\u2028more",
    "too_long": "k" * (API_KEY_MAX_LENGTH + 1),
    "empty": "",
}

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and symbolic links")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


@posix_only
def test_a_new_key_file_is_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "keys" / "kiosk.key"
    old = os.umask(0)  # a permissive umask must not widen the file
    try:
        store_key(str(target), KEY)
    finally:
        os.umask(old)
    assert mode(target) == 0o600
    assert target.read_text() == KEY + "\n"
    assert load_key(str(target)) == KEY
    assert leftovers(target.parent, target.name) == []


@posix_only
def test_a_stale_tmp_file_readable_by_others_does_not_make_the_key_readable(tmp_path: Path) -> None:
    target = tmp_path / "kiosk.key"
    stale = tmp_path / "kiosk.key.tmp"  # the fixed name older versions wrote through, left by a crash
    stale.write_text("old")
    stale.chmod(0o644)
    store_key(str(target), KEY)
    assert mode(target) == 0o600
    assert load_key(str(target)) == KEY


@posix_only
def test_a_link_planted_at_the_old_tmp_name_is_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "kiosk.key"
    attacker = tmp_path / "attacker.txt"
    attacker.write_text("")
    attacker.chmod(0o666)
    (tmp_path / "kiosk.key.tmp").symlink_to(attacker)
    store_key(str(target), KEY)
    assert attacker.read_text() == ""  # the key never went into the attacker's file
    assert not target.is_symlink()
    assert target.is_file()
    assert mode(target) == 0o600
    assert load_key(str(target)) == KEY


@posix_only
def test_a_link_at_the_target_is_refused_for_writing_and_for_reading(tmp_path: Path) -> None:
    attacker = tmp_path / "attacker.txt"
    attacker.write_text("sk-the-attackers-own-key\n")
    target = tmp_path / "kiosk.key"
    target.symlink_to(attacker)
    with pytest.raises(ConfigurationError, match="symbolic link") as stored:
        store_key(str(target), KEY)
    assert str(target) in str(stored.value)
    assert attacker.read_text() == "sk-the-attackers-own-key\n"
    assert target.is_symlink()  # left as it was: the user decides
    with pytest.raises(ConfigurationError, match="symbolic link") as loaded:
        load_key(str(target))  # a key read through a link would be sent to the gateway as this agent's
    assert str(target) in str(loaded.value)
    assert leftovers(tmp_path, target.name) == ["attacker.txt"]


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_a_bad_minted_key_is_refused_and_never_stored(tmp_path: Path, name: str) -> None:
    bad = BAD_KEYS[name]
    target = tmp_path / "kiosk.key"
    with pytest.raises(PaymentRequiredError) as info:
        validate_api_key(bad, "http://127.0.0.1:8402/v1/auth/keys")
    assert info.value.code == "key_mint_failed"
    assert "http://127.0.0.1:8402/v1/auth/keys" in str(info.value)
    with pytest.raises(PaymentRequiredError) as stored:
        store_key(str(target), bad)
    assert stored.value.code == "key_mint_failed"
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    if bad:  # the message names the problem, never the key
        assert bad not in str(info.value)
        assert bad not in str(stored.value)


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_a_bad_key_is_never_put_in_the_environment(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.delenv("LLM402_TEST_KEY", raising=False)
    with pytest.raises(PaymentRequiredError) as info:
        store_key("env:LLM402_TEST_KEY", BAD_KEYS[name])
    assert info.value.code == "key_mint_failed"
    assert "LLM402_TEST_KEY" not in os.environ


@pytest.mark.parametrize("name", sorted(set(BAD_KEYS) - {"empty", "nul"}))
def test_a_bad_key_in_the_environment_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("LLM402_TEST_KEY", BAD_KEYS[name])
    with pytest.raises(ConfigurationError, match=r"\$LLM402_TEST_KEY") as info:
        load_key("env:LLM402_TEST_KEY")
    assert BAD_KEYS[name] not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"sk-good\nx-evil: 1\n",
        b"sk-good\r\nmore\r\n",
        b"sk-good\x00more",
        b"sk-g\xc3\xb6\xc3\xb6d\n",  # UTF-8 non-ASCII
        b"sk-g\xf6\xf6d\n",  # not UTF-8 at all
        b"sk-good\xe2\x80\xa8more",  # U+2028
        b"k" * (API_KEY_MAX_LENGTH + 1),
        b"k" * 10_000,
    ],
)
def test_a_bad_key_in_a_file_is_a_configuration_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    target = tmp_path / "kiosk.key"
    target.write_bytes(content)
    target.chmod(0o600)
    with pytest.raises(ConfigurationError) as info:
        load_key(str(target))
    assert str(target) in str(info.value)


def test_a_bad_stored_key_fails_when_the_gateway_is_made_not_in_httpx(tmp_path: Path) -> None:
    from llm402 import Gateway, Policy, Wallet

    target = tmp_path / "kiosk.key"
    target.write_bytes(b"sk-good\r\nx-evil: 1\n")
    target.chmod(0o600)
    with pytest.raises(ConfigurationError, match=r"kiosk\.key"):
        Gateway(
            "http://127.0.0.1:9/v1",
            wallet=Wallet.create(),
            policy=Policy(max_payment_usd="0.05"),
            ledger="memory://",
            profile="token-kiosk",
            key_store=str(target),
        )


def test_a_good_key_round_trips_and_whitespace_around_it_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert validate_api_key(KEY, "x") == KEY
    assert validate_api_key("k" * API_KEY_MAX_LENGTH, "x") == "k" * API_KEY_MAX_LENGTH
    target = tmp_path / "kiosk.key"
    target.write_bytes(b"  " + KEY.encode() + b"\r\n")
    assert load_key(str(target)) == KEY
    assert load_key(str(tmp_path / "missing.key")) is None
    target.write_bytes(b"\n")
    assert load_key(str(target)) is None
    monkeypatch.delenv("LLM402_TEST_KEY", raising=False)
    store_key("env:LLM402_TEST_KEY", KEY)
    assert load_key("env:LLM402_TEST_KEY") == KEY
    assert load_key(None) is None


@posix_only
def test_a_key_file_left_readable_by_others_is_tightened_on_load(tmp_path: Path) -> None:
    target = tmp_path / "kiosk.key"
    target.write_text(KEY + "\n")
    target.chmod(0o644)
    assert load_key(str(target)) == KEY
    assert mode(target) == 0o600


@posix_only
def test_a_fifo_at_the_key_path_is_refused_without_blocking(tmp_path: Path) -> None:
    target = tmp_path / "kiosk.key"
    os.mkfifo(target)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load_key(str(target))
    with pytest.raises(ConfigurationError, match="not a regular file"):
        store_key(str(target), KEY)


@posix_only
def test_concurrent_writers_leave_one_whole_key_file(tmp_path: Path) -> None:
    target = tmp_path / "kiosk.key"
    threads, rounds = 8, 25
    keys = [f"sk-writer-{i:02d}-" + "x" * (i * 7) for i in range(threads)]  # lengths differ: a mix would show
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def write(key: str) -> None:
        start.wait()
        try:
            for _ in range(rounds):
                store_key(str(target), key)
                assert load_key(str(target)) in keys  # every reader sees a whole key, never a mix
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(key,)) for key in keys]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert load_key(str(target)) in keys
    assert target.read_text().count("\n") == 1
    assert mode(target) == 0o600
    assert leftovers(tmp_path, target.name) == []
