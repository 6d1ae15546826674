"""Who signs: the `Signer` protocol and a local eth-account `Wallet`.

A hardware, KMS or remote signer replaces `Wallet` by implementing `Signer`. The wallet's repr, str and every error
message are redacted: only the address is ever shown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

from .errors import WalletError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

ENV_PRIVATE_KEY = "LLM402_PRIVATE_KEY"
ENV_KEYSTORE = "LLM402_KEYSTORE"
ENV_KEYSTORE_PASSWORD = "LLM402_KEYSTORE_PASSWORD"  # noqa: S105 - the name of a variable, not a secret


@runtime_checkable
class Signer(Protocol):
    """What llm402 needs from a wallet (the x402 SDK's ``ClientEvmSigner`` plus EIP-191 for SIWE)."""

    @property
    def address(self) -> str:
        """The checksummed address that pays."""
        ...

    def sign_typed_data(self, domain: Any, types: dict[str, Any], primary_type: str, message: dict[str, Any]) -> bytes:
        """Sign EIP-712 typed data; returns the 65-byte signature."""
        ...

    def sign_message(self, message: str) -> bytes:
        """Sign an EIP-191 personal message (SIWE); returns the 65-byte signature."""
        ...


def _as_plain(value: Any) -> Any:
    """The SDK passes dataclass-like domain/field objects; eth-account wants plain dicts."""
    if isinstance(value, dict):
        return value
    if hasattr(value, "verifying_contract"):
        return {
            "name": value.name,
            "version": value.version,
            "chainId": value.chain_id,
            "verifyingContract": value.verifying_contract,
        }
    if hasattr(value, "name") and hasattr(value, "type"):
        return {"name": value.name, "type": value.type}
    return value


_DOMAIN_FIELDS = (
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
    ("salt", "bytes32"),
)
_ATOMIC = frozenset({"address", "uint256", "bytes32", "string", "bool"})


class _TypedDigest:
    """EIP-712 digests of structs made of address, uint256, bytes32, string, bool and nested structs, computed
    directly (the payment hot path: EIP-3009 authorizations, Permit2 ``upto`` ceilings).

    eth-account's general encoder spends 0.25-2.5 ms per payment rebuilding type strings and validating values; the
    digest is the same bytes (checked against eth-account in the tests), so signing it with libsecp256k1 gives the
    same signature. Anything else (arrays, other widths) goes to eth-account.
    """

    def __init__(self) -> None:
        from eth_utils.crypto import keccak

        self.keccak = keccak
        self._type_hashes: dict[tuple[Any, ...], dict[str, bytes]] = {}
        self._separators: dict[tuple[Any, ...], bytes] = {}

    def applies(self, domain: dict[str, Any], types: dict[str, Any], primary_type: str) -> bool:
        """Whether every field is of a kind this encoder writes and the domain uses only the standard fields."""
        known = dict(_DOMAIN_FIELDS)
        if primary_type not in types or not set(domain) <= set(known):
            return False
        structs = set(types) - {"EIP712Domain"}
        return all(
            isinstance(fields, list) and all(f["type"] in _ATOMIC or f["type"] in structs for f in fields)
            for name, fields in types.items()
            if name != "EIP712Domain"
        )

    def _hashes(self, types: dict[str, Any]) -> dict[str, bytes]:
        key = tuple((name, tuple((f["name"], f["type"]) for f in fields)) for name, fields in types.items())
        hashes = self._type_hashes.get(key)
        if hashes is None:

            def signature(name: str) -> str:
                return name + "(" + ",".join(f"{f['type']} {f['name']}" for f in types[name]) + ")"

            def dependencies(name: str, found: set[str]) -> set[str]:
                for f in types[name]:
                    if f["type"] in types and f["type"] not in found:
                        found.add(f["type"])
                        dependencies(f["type"], found)
                return found

            hashes = {
                name: self.keccak(
                    text=signature(name) + "".join(signature(d) for d in sorted(dependencies(name, set()) - {name}))
                )
                for name in types
            }
            self._type_hashes[key] = hashes
        return hashes

    def _struct(self, name: str, types: dict[str, Any], hashes: dict[str, bytes], data: dict[str, Any]) -> bytes:
        words = [hashes[name]]
        for f in types[name]:
            kind, value = f["type"], data[f["name"]]
            if kind in hashes:
                words.append(self._struct(kind, types, hashes, value))
            elif kind == "string":
                words.append(self.keccak(text=str(value)))
            else:
                words.append(_word(kind, value))
        return bytes(self.keccak(b"".join(words)))

    def __call__(
        self, domain: dict[str, Any], types: dict[str, Any], primary_type: str, message: dict[str, Any]
    ) -> bytes:
        key = tuple(domain.items())
        separator = self._separators.get(key)
        if separator is None:
            fields = [{"name": n, "type": t} for n, t in _DOMAIN_FIELDS if n in domain]
            domain_types = {"EIP712Domain": fields}
            separator = self._struct("EIP712Domain", domain_types, self._hashes(domain_types), domain)
            self._separators[key] = separator
        struct = self._struct(primary_type, types, self._hashes(types), message)
        return bytes(self.keccak(b"\x19\x01" + separator + struct))


def _word(kind: str, value: Any) -> bytes:
    """One EIP-712 encoded atomic field (address, uint256, bytes32 or bool)."""
    if kind == "uint256":
        number = int(value, 16) if isinstance(value, str) and value.startswith("0x") else int(value)
        return number.to_bytes(32, "big")
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError("a bool field needs a bool")
        return int(value).to_bytes(32, "big")
    raw = value if isinstance(value, bytes) else bytes.fromhex(str(value).removeprefix("0x"))
    if kind == "address":
        if len(raw) != 20:
            raise ValueError("an address is 20 bytes")
        return bytes(12) + raw
    if len(raw) != 32:
        raise ValueError("a bytes32 is 32 bytes")
    return raw


_digest: _TypedDigest | None = None


class Wallet:
    """A local secp256k1 key (eth-account; libsecp256k1 through `coincurve` for payments)."""

    __slots__ = ("_account", "_secp")
    blocking = False
    """Signs in this process, in well under a millisecond: an async transport need not leave the event loop for it
    (a `Signer` without this attribute, e.g. a remote one, is treated as blocking)."""

    def __init__(self, account: LocalAccount) -> None:
        self._account = account
        self._secp: Any = None

    @classmethod
    def from_key(cls, private_key: str | bytes) -> Wallet:
        """A wallet from a hex or raw 32-byte private key."""
        from eth_account import Account

        try:
            return cls(Account.from_key(private_key))
        except Exception:
            raise WalletError("invalid private key (expected 32 bytes, hex-encoded, optionally 0x-prefixed)") from None

    @classmethod
    def from_keystore(cls, path: str | os.PathLike[str], password: str) -> Wallet:
        """A wallet from an encrypted JSON keystore (the go-ethereum / eth-account format)."""
        from eth_account import Account

        file = Path(path).expanduser()
        try:
            keyfile = json.loads(file.read_text())
        except OSError as exc:
            raise WalletError(f"cannot read keystore {file}: {exc.strerror}") from None
        except ValueError:
            raise WalletError(f"keystore {file} is not JSON") from None
        try:
            key = Account.decrypt(keyfile, password)
        except Exception:
            raise WalletError(f"cannot decrypt keystore {file} (wrong password or corrupt file)") from None
        return cls(Account.from_key(key))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Wallet:
        """``LLM402_PRIVATE_KEY``, or ``LLM402_KEYSTORE`` with ``LLM402_KEYSTORE_PASSWORD``."""
        env = os.environ if environ is None else environ
        if key := env.get(ENV_PRIVATE_KEY):
            try:
                return cls.from_key(key)
            except WalletError:
                raise WalletError(f"{ENV_PRIVATE_KEY} is not a valid private key") from None
        if keystore := env.get(ENV_KEYSTORE):
            password = env.get(ENV_KEYSTORE_PASSWORD)
            if password is None:
                raise WalletError(f"{ENV_KEYSTORE} is set but {ENV_KEYSTORE_PASSWORD} is not")
            return cls.from_keystore(keystore, password)
        raise WalletError(f"no wallet configured: set {ENV_PRIVATE_KEY}, or {ENV_KEYSTORE} and {ENV_KEYSTORE_PASSWORD}")

    @classmethod
    def create(cls) -> Wallet:
        """A throwaway wallet with a fresh random key (demos and tests)."""
        from eth_account import Account

        return cls(Account.create())

    @property
    def address(self) -> str:
        """The checksummed address."""
        return str(self._account.address)

    def sign_typed_data(self, domain: Any, types: dict[str, Any], primary_type: str, message: dict[str, Any]) -> bytes:
        """Sign EIP-712 typed data (EIP-3009 authorizations, Permit2)."""
        global _digest  # noqa: PLW0603 - one lazily built, immutable digest helper for the process
        plain_types = {name: [_as_plain(f) for f in fields] for name, fields in types.items()}
        plain_domain = _as_plain(domain)
        if _digest is None:
            _digest = _TypedDigest()
        if _digest.applies(plain_domain, plain_types, primary_type):
            try:
                return self._sign_digest(_digest(plain_domain, plain_types, primary_type, message))
            except (ValueError, KeyError, TypeError, OverflowError) as exc:
                raise WalletError(f"cannot sign {primary_type}: {type(exc).__name__}") from None
        plain_types.pop("EIP712Domain", None)
        try:
            signed = self._account.sign_typed_data(
                domain_data=plain_domain, message_types=plain_types, message_data=message
            )
        except Exception as exc:
            raise WalletError(f"cannot sign typed data {primary_type}: {type(exc).__name__}") from None
        return bytes(signed.signature)

    def _sign_digest(self, digest: bytes) -> bytes:
        """r || s || v (27/28) over a 32-byte digest, with libsecp256k1 (deterministic RFC 6979, low s)."""
        if self._secp is None:
            from coincurve import PrivateKey

            self._secp = PrivateKey(bytes(self._account.key))
        signature: bytes = self._secp.sign_recoverable(digest, hasher=None)
        return signature[:64] + bytes([signature[64] + 27])

    def sign_message(self, message: str) -> bytes:
        """Sign an EIP-191 personal message."""
        from eth_account.messages import encode_defunct

        signed = self._account.sign_message(encode_defunct(text=message))
        return bytes(signed.signature)

    def encrypt(self, password: str) -> dict[str, Any]:
        """The wallet as an encrypted keystore (to save with mode 0600)."""
        return dict(self._account.encrypt(password))

    def export_private_key(self) -> str:
        """The private key as hex. Deliberately explicit: nothing else in llm402 ever reveals it."""
        return "0x" + bytes(self._account.key).hex()

    def __repr__(self) -> str:
        return f"Wallet(address={self.address}, key=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise WalletError("a Wallet cannot be pickled or copied (it holds a private key)")
