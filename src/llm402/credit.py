"""Credit gateways (Token Kiosk, AIsa ``api_key_proxy``): SIWE messages, top-up sizing, where minted keys live.

Everything here is pure except `store_key` (which the engine calls) and `load_key`. Top-ups are transfers into prepaid
credit, not consumption: the consumption caps count what calls cost, and top-ups are bounded by their own limits (one
top-up: `Policy.topup_max`; a day's: `Policy.daily_topup_cap`, held in the ledger's ``<agent>#topup`` account).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import ConfigurationError, PaymentRequiredError, PolicyRefusal
from .money import ATOMIC_PER_USD, atomic_to_usd, format_usd
from .policy import Policy

SIWE_STATEMENT = "Sign in to the AI Gateway"
log = logging.getLogger("llm402")


@dataclass(frozen=True, slots=True)
class CreditProfile:
    """Where a credit gateway keeps its credit endpoints (paths relative to its OpenAI base URL, e.g. ``.../v1``)."""

    topup_path: str = "/topup"
    keys_path: str = "/auth/keys"
    balance_path: str = "/balance/{wallet}"
    usage_path: str = "/usage/{wallet}"
    topups_path: str = "/topups/{wallet}"
    min_topup: int = 1 * ATOMIC_PER_USD
    chain_id: int | None = None
    statement: str = SIWE_STATEMENT
    insufficient_codes: frozenset[str] = frozenset({"INSUFFICIENT_BALANCE"})


def topup_body(amount: int) -> bytes:
    """The top-up request body, ``{"amount": <USD>}``, with the USD number written exactly (no float on the way)."""
    usd = atomic_to_usd(amount).normalize()
    return b'{"amount":' + format(usd, "f").encode() + b"}"


def siwe_message(address: str, uri: str, chain_id: int, statement: str = SIWE_STATEMENT) -> str:
    """A fresh EIP-4361 message (new nonce, ``issuedAt`` now) for the endpoint ``uri``: the domain is its
    host[:port] and the uri the endpoint itself, as the gateway presents them.

    ``chain_id`` may come from a gateway's 402: it must be a positive integer. No text that goes into the message may
    hold a control character or a line separator (`identity.control_character`); raises `ConfigurationError`.
    """
    from urllib.parse import urlsplit

    from siwe import SiweMessage

    from .identity import control_character

    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id <= 0:
        raise ConfigurationError(f"a SIWE message needs a positive integer chain id, not {chain_id!r}")
    for field, value in (("address", address), ("uri", uri), ("statement", statement)):
        found = control_character(value)
        if found is not None:
            raise ConfigurationError(
                f"refusing to sign a SIWE message: its {field} holds a control character ({found})"
            )
    message = SiweMessage(
        domain=urlsplit(uri).netloc,
        address=address,
        uri=uri,
        version="1",
        chain_id=chain_id,
        issued_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        nonce=secrets.token_hex(8),
        statement=statement,
    )
    text: str = message.prepare_message()
    return text


def topup_amount(needed: int, gateway_min: int, policy: Policy) -> int:
    """How much to top up: at least what the call needs, the gateway's minimum and the policy's preferred size; never
    above the policy's top-up limit (default: the max ticket). What the day's top-ups have left is the ledger's to
    check (the top-up's reservation). Raises `PolicyRefusal` (``topup_refused``)."""
    amount = max(needed, gateway_min, policy.topup_min or 0)
    limit = policy.topup_max
    if limit is not None and amount > limit:
        raise PolicyRefusal(
            f"a top-up of {format_usd(amount)} is above the policy's top-up limit of {format_usd(limit)}",
            code="topup_refused",
            requested=amount,
            cap=limit,
        )
    return amount


# --- minted API keys --------------------------------------------------------------------------------------------

API_KEY_MAX_LENGTH = 512
"""The longest API key llm402 keeps or sends (Token Kiosk's keys are 51 characters)."""
_KEY_FILE_LIMIT = 4096  # a key file is read up to this many bytes; a bigger one is not a key file
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_RULE = f"an API key is 1 to {API_KEY_MAX_LENGTH} visible ASCII characters, without spaces"


def _key_problem(key: object) -> str | None:
    """What is wrong with ``key`` as a bearer token (never quoting it), or ``None`` when it is usable."""
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not a string"
    if not key:
        return "is empty"
    if len(key) > API_KEY_MAX_LENGTH:
        return f"is {len(key)} characters long"
    if key.isascii() and key.isprintable() and " " not in key:
        return None
    for char in key:
        if not char.isascii():
            return "holds a non-ASCII character"
        if char == " ":
            return "holds a space"
        if not char.isprintable():
            return f"holds a control character (U+{ord(char):04X})"
    return None  # pragma: no cover - one of the checks above matched


def validate_api_key(key: str, source: str) -> str:
    """``key`` as is when it can be kept and sent as a bearer token (1 to 512 visible ASCII characters, no spaces).

    For a key a gateway just minted: call it before the key is stored or sent. ``source`` says where the key came from
    (e.g. the minting URL); it is named in the error, the key never is. Raises `PaymentRequiredError` with code
    ``key_mint_failed``.
    """
    problem = _key_problem(key)
    if problem is not None:
        raise PaymentRequiredError(
            f"refusing the API key from {source}: it {problem} ({_KEY_RULE}); it was neither stored nor sent",
            code="key_mint_failed",
        )
    return key


def _env_name(target: str) -> str:
    name = target[4:]
    if not _ENV_NAME.fullmatch(name):
        raise ConfigurationError(
            f"key store {target!r} needs a variable name of letters, digits and underscores, e.g. env:LLM402_API_KEY"
        )
    return name


def store_key(target: str, key: str) -> None:
    """Keep a minted API key: ``env:NAME`` sets an environment variable of this process; anything else is a file
    path, replaced atomically by a file of mode 0600.

    The key is checked first (`validate_api_key`: a bad key raises `PaymentRequiredError` ``key_mint_failed`` and is
    never stored). The file is written under a fresh, unpredictable name in the same folder, created exclusively
    (``O_CREAT | O_EXCL | O_NOFOLLOW``: never an existing file, never through a link) with mode 0600, synced, then
    renamed over ``target``. A ``target`` that is a symbolic link is refused with `ConfigurationError`: a link there
    is either planted, or the user's own pointer to the real file, and neither should be silently replaced.
    """
    validate_api_key(key, f"the gateway (to be stored in {target})")
    if target.startswith("env:"):
        os.environ[_env_name(target)] = key
        return
    path = Path(target).expanduser()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_symlink():
        raise ConfigurationError(
            f"key store {path} is a symbolic link; llm402 neither writes through nor replaces one: "
            "remove the link, or set key_store to the file it points to"
        )
    if path.exists() and not path.is_file():
        raise ConfigurationError(f"key store {path} exists and is not a regular file")
    fd, tmp = _private_file(folder, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # replaces the directory entry: never follows a link planted after the check above
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _private_file(folder: Path, name: str) -> tuple[int, Path]:
    """A new file of mode 0600 in ``folder`` under an unpredictable name, opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(8):
        tmp = folder / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp
    raise ConfigurationError(f"cannot create a temporary key file in {folder}")  # pragma: no cover


def load_key(target: str | None) -> str | None:
    """A key kept by `store_key`, if there is one.

    A kept key that is not a usable bearer token (control characters, non-ASCII, spaces, too long), or a key store
    that is a symbolic link or not a regular file, raises `ConfigurationError` naming the file or variable. A key file
    readable by others (as an older llm402 could leave one) is set to mode 0600, with a warning.
    """
    if not target:
        return None
    if target.startswith("env:"):
        name = _env_name(target)
        env_key = os.environ.get(name)
        if not env_key:
            return None
        problem = _key_problem(env_key)
        if problem is not None:
            raise ConfigurationError(f"the API key in ${name} {problem} ({_KEY_RULE}): fix or unset {name}")
        return env_key
    path = Path(target).expanduser()
    data = _read_key_file(path)
    if data is None:
        return None
    text = data.strip()
    if not text:
        return None
    key = text.decode("ascii", errors="replace")  # U+FFFD for any non-ASCII byte: refused below as non-ASCII
    problem = _key_problem(key)
    if problem is not None:
        raise ConfigurationError(
            f"the API key in {path} {problem} ({_KEY_RULE}): fix the file, or delete it to mint a new key"
        )
    return key


def _read_key_file(path: Path) -> bytes | None:
    """The bytes of the key file at ``path`` (``None`` when there is none), never through a link, never blocking."""
    if path.is_symlink():  # also checked by O_NOFOLLOW where the platform has it
        raise ConfigurationError(f"key store {path} is a symbolic link; llm402 does not read keys through one")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(
                f"key store {path} is a symbolic link; llm402 does not read keys through one"
            ) from None
        raise ConfigurationError(f"cannot read the key store {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"key store {path} is not a regular file")
        if info.st_mode & 0o077 and hasattr(os, "fchmod"):
            try:
                os.fchmod(fd, 0o600)
                log.warning(
                    "the key file %s was readable by others; it is now mode 0600 (consider revoking the key)", path
                )
            except OSError:
                log.warning("the key file %s is readable by others and cannot be changed to mode 0600", path)
        chunks: list[bytes] = []
        size = 0
        while size <= _KEY_FILE_LIMIT:
            chunk = os.read(fd, _KEY_FILE_LIMIT + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > _KEY_FILE_LIMIT:
        raise ConfigurationError(f"the key store {path} is larger than {_KEY_FILE_LIMIT} bytes: not a key file")
    return b"".join(chunks)
