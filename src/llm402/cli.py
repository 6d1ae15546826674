"""The ``llm402`` command: demo, sandbox, spend, receipts, quote, and credit-gateway account operations.

One error boundary (`run`) serves every command: a failure is one line on stderr (one JSON object with ``--json``)
and a distinct exit code (`EXIT_CODES`); the parser validates values (durations, dates, USD amounts, URLs) so a
mistyped option is a usage error, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sqlite3
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from ._version import __version__


def make_console(*, stderr: bool = False) -> Console:
    """A rich console: the terminal's width on a terminal, else (a pipe, a file) 160 columns unless ``COLUMNS`` says,
    so tables written to a file are not squeezed to 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(highlight=False, stderr=stderr, width=160 if wide else None)


console = make_console()

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_REFUSED = 4
EXIT_GATEWAY = 5
EXIT_NETWORK = 6
EXIT_INTERRUPTED = 130
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success (also when a reader such as `head` closes the output early)"),
    (EXIT_UNEXPECTED, "unexpected error, a bug (--debug prints the traceback)"),
    (EXIT_USAGE, "usage: a missing or invalid option or value"),
    (EXIT_CONFIG, "configuration: wallet, policy, ledger URL, a file, a port in use"),
    (EXIT_REFUSED, "refused by the policy or a budget cap (nothing was paid for it)"),
    (EXIT_GATEWAY, "the gateway answered an error, or its payment flow failed"),
    (EXIT_NETWORK, "network: connection refused, DNS failure, timeout, unreachable ledger"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); `chat --stream` says what the call cost so far"),
)
ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("LLM402_PRIVATE_KEY", "the wallet's private key (0x...)"),
    ("LLM402_KEYSTORE", "or an encrypted keystore file (JSON) ..."),
    ("LLM402_KEYSTORE_PASSWORD", "... and its password"),
    ("LLM402_POLICY", "a TOML/JSON policy file (--policy; default: $1 max ticket, $10 per agent per UTC day)"),
    ("LLM402_LEDGER", "the ledger URL (--ledger; default: sqlite:///~/.llm402/ledger.db)"),
    ("LLM402_ETH_RPC", "an Ethereum JSON-RPC URL: verifies an ENS --agent name against the wallet"),
    ("LLM402_ENS_REGISTRY", "the ENS registry on that chain (default: ENS's own)"),
    ("AISA_API_KEY", "the API key for --profile aisa"),
    ("LLM402_SANDBOX_URL", "where `llm402 sandbox` listens, for `wallet fund` (default: http://127.0.0.1:8402)"),
    ("LLM402_API_KEY, LLM402_BASE_URL, LLM402_MODEL", "read by LangChain's ChatGateway, not by this command"),
    ("NO_COLOR", "plain terminal output"),
)


def _epilog() -> str:
    codes = "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES)
    names = "\n".join(
        f"  {name:<26} {text}" if len(name) <= 26 else f"  {name}\n  {'':<26} {text}" for name, text in ENVIRONMENT
    )
    return (
        f"environment:\n{names}\n\nexit codes:\n{codes}\n\n"
        "Errors are one line on stderr; with --json, one JSON object: "
        '{"error": {"code": ..., "message": ..., "exit_code": ...}}.'
    )


# --- the error boundary ------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A command line that cannot be run as given (exit 2, like argparse's own errors)."""

    def __init__(self, message: str, prog: str = "llm402") -> None:
        super().__init__(message)
        self.message = message
        self.prog = prog


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the interrupted call cost so far (``details``: atomic and USD amounts)."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True, slots=True)
class Failure:
    """How an exception ends the command: an exit code, a stable code, one line of text and JSON details."""

    exit_code: int
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """The one line printed on stderr (a usage error names its command itself: ``llm402 spend: ...``)."""
        text = " ".join(self.message.split())
        return text if self.code == "usage" else f"llm402: {text}"

    def document(self) -> dict[str, Any]:
        """The JSON printed on stderr with ``--json``."""
        error: dict[str, Any] = {"code": self.code, "message": " ".join(self.message.split())}
        error["exit_code"] = self.exit_code
        if self.details:
            error["details"] = self.details
        return {"error": error}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as `UsageError` (so the boundary prints them, one line or JSON)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


class IntermixedParser(Parser):
    """A parser whose positionals may follow its options (``wallet fund --amount 2 0xADDRESS``): argparse alone binds
    an optional positional (``nargs="?"``) to nothing as soon as an option comes first."""

    _mixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._mixing:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _host_of(exc: BaseException, base_url: str | None) -> str:
    """host:port of the gateway: the command's ``--base-url`` (a router's requests go to a placeholder host), else
    the failed request's."""
    url: Any = base_url
    if url is None:
        try:
            url = exc.request.url  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            url = None
    if url is None:
        return "the gateway"
    parts = urlsplit(str(url))
    return parts.netloc.rpartition("@")[2] or str(url)


def _network_failure(exc: BaseException, target: str) -> Failure:
    """Connection refused, DNS failure, timeout, or another transport error, as one friendly line."""
    import httpx

    chain = list(_chain(exc))
    text = " ".join(str(e) for e in chain).lower()
    host = target.rpartition(":")[0] if target.count(":") == 1 else target
    if any(isinstance(e, socket.gaierror) for e in chain) or any(
        marker in text for marker in ("name or service not known", "nodename nor servname", "name resolution")
    ):
        return Failure(EXIT_NETWORK, "dns_failure", f"cannot resolve {host}: DNS lookup failed (check --base-url)")
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "connection refused" in text:
        return Failure(
            EXIT_NETWORK, "connection_refused", f"connection refused by {target}: is the gateway running there?"
        )
    if any(isinstance(e, httpx.TimeoutException | TimeoutError | socket.timeout) for e in chain):
        return Failure(EXIT_NETWORK, "timeout", f"timed out talking to {target} (try a longer --timeout)")
    reason = str(exc) or type(exc).__name__
    return Failure(EXIT_NETWORK, "network_error", f"network error talking to {target}: {reason}")


def safe_url(url: str) -> str:
    """A URL without its user and password (ledger URLs may carry a Redis password)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _ledger_url(args: argparse.Namespace | None) -> str:
    from .budget import default_ledger_url

    return safe_url(getattr(args, "ledger", None) or default_ledger_url())


def _raised_in(exc: BaseException, *packages: str) -> bool:
    """Whether ``exc`` was raised while code of one of ``packages`` ran (a frame of its traceback is theirs)."""
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if any(module == p or module.startswith(p + ".") for p in packages):
            return True
        tb = tb.tb_next
    return False


def _redis_failure(exc: BaseException, args: argparse.Namespace | None) -> Failure | None:
    if "redis" not in sys.modules:
        return None
    if isinstance(exc, ValueError | TypeError) and _raised_in(exc, "redis"):  # redis-py parsing the ledger URL
        return Failure(EXIT_CONFIG, "invalid_ledger_url", f"invalid ledger URL {_ledger_url(args)}: {exc}")
    from redis import exceptions as redis_errors

    if not isinstance(exc, redis_errors.RedisError):
        return None
    ledger = _ledger_url(args)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, redis_errors.AuthenticationError):
        return Failure(EXIT_CONFIG, "ledger_auth_failed", f"the ledger at {ledger} refused the login: {reason}")
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return Failure(
            EXIT_NETWORK,
            "ledger_unreachable",
            f"cannot reach the ledger at {ledger}: {reason} (is Redis running? set --ledger or LLM402_LEDGER)",
        )
    return Failure(EXIT_CONFIG, "ledger_error", f"the ledger at {ledger} failed: {reason}")


def _database_failure(exc: BaseException, args: argparse.Namespace | None) -> Failure | None:
    """A SQL ledger server that cannot be reached (a driver's ``OperationalError``, e.g. psycopg's)."""
    module = type(exc).__module__ or ""
    if not module.startswith(("psycopg", "asyncpg", "pg8000")):
        return None
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if any(cls.__name__ == "OperationalError" for cls in type(exc).__mro__):
        return Failure(EXIT_NETWORK, "ledger_unreachable", f"cannot reach the ledger at {_ledger_url(args)}: {reason}")
    return Failure(EXIT_CONFIG, "ledger_error", f"the ledger at {_ledger_url(args)} failed: {reason}")


def failure_of(exc: BaseException, args: argparse.Namespace | None = None) -> Failure:
    """Classify an exception that ended a command (see `EXIT_CODES`)."""
    import httpx

    from .errors import ConfigurationError, GatewayError, Llm402Error, PaymentRequiredError, PolicyRefusal, WalletError

    if isinstance(exc, UsageError):
        return Failure(EXIT_USAGE, "usage", f"{exc.prog}: {exc.message} (see {exc.prog} --help)")
    if isinstance(exc, Interrupted):
        return Failure(EXIT_INTERRUPTED, "interrupted", exc.message, dict(exc.details))
    if isinstance(exc, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted", "interrupted")
    if isinstance(exc, Llm402Error):
        details = dict(getattr(exc, "details", {}) or {})
        message = str(exc)
        if isinstance(exc, PolicyRefusal):
            return Failure(EXIT_REFUSED, exc.code, f"refused by policy ({exc.code}): {message}", details)
        if isinstance(exc, ConfigurationError):
            return Failure(EXIT_CONFIG, exc.code, f"configuration error: {message}")
        if isinstance(exc, WalletError):
            return Failure(EXIT_CONFIG, exc.code, f"wallet error: {message}")
        if isinstance(exc, PaymentRequiredError):
            return Failure(EXIT_GATEWAY, exc.code, f"payment failed ({exc.code}): {message}", details)
        if isinstance(exc, GatewayError):
            return Failure(EXIT_GATEWAY, exc.code, f"gateway error: {message}", {"status": exc.status})
        return Failure(EXIT_GATEWAY, exc.code, message)
    ledger_failure = _redis_failure(exc, args) or _database_failure(exc, args)
    if ledger_failure is not None:
        return ledger_failure
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return Failure(EXIT_CONFIG, "invalid_url", f"invalid URL: {exc}")
    if isinstance(exc, httpx.TransportError):
        return _network_failure(exc, _host_of(exc, getattr(args, "base_url", None)))
    if isinstance(exc, httpx.HTTPStatusError):
        return Failure(EXIT_GATEWAY, f"http_{exc.response.status_code}", f"gateway error: {exc}")
    if isinstance(exc, sqlite3.Error):
        return Failure(EXIT_CONFIG, "ledger_error", f"the ledger at {_ledger_url(args)} failed: {exc}")
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return _network_failure(exc, _host_of(exc, getattr(args, "base_url", None)))
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return Failure(EXIT_CONFIG, "os_error", f"{exc.strerror}{where}")
    return Failure(
        EXIT_UNEXPECTED,
        "unexpected_error",
        f"unexpected {type(exc).__name__}: {exc} (a bug; run again with --debug for the traceback)",
    )


def _report(failure: Failure, as_json: bool) -> None:
    text = json.dumps(failure.document(), default=str) if as_json else failure.line()
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any, **kw: Any
) -> None:
    sys.stderr.write(f"llm402: warning: {' '.join(str(message).split())}\n")


def run(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with the parser ``build`` makes, run the chosen command, and turn any failure into one line
    (or one JSON object) on stderr and an exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in words
    args: argparse.Namespace | None = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            args = build().parse_args(words)
            code: int = args.run(args)
            sys.stdout.flush()
    except SystemExit:  # --help, --version
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        raise
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as exc:
        failure = failure_of(exc, args)
        if getattr(args, "debug", False) or ("--debug" in words and args is None):
            traceback.print_exc()
        _report(failure, as_json or bool(getattr(args, "json", False)))
        return failure.exit_code
    return code


# --- values the parser checks ------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)\s*(m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


def since_arg(value: str) -> float:
    """``--since``: a duration back from now (``30m``, ``24h``, ``7d``, ``7days``, ``2w``), ``today``, or an ISO
    date or time (``2025-01-31``, ``2025-01-31T08:00``, UTC unless it names a zone); Unix seconds."""
    text = value.strip().lower()
    if text == "today":
        return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    match = _DURATION.fullmatch(text)
    if match:
        return time.time() - int(match[1]) * _UNIT_SECONDS[match[2][0]]
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a duration (30m, 24h, 7d, 2w), 'today', nor an ISO date or time "
            "(2025-01-31, 2025-01-31T08:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def usd_arg(value: str) -> Decimal:
    """A positive USD amount with at most six decimals (``5``, ``0.25``, ``$1.50``)."""
    from .money import usd_to_atomic

    try:
        atomic = usd_to_atomic(value)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a USD amount (e.g. 5 or 0.25, six decimals at most)"
        ) from None
    if atomic <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the amount must be more than zero")
    return Decimal(atomic) / 10**6


def positive_int(value: str) -> int:
    """An integer above zero."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be at least 1")
    return number


def positive_float(value: str) -> float:
    """A finite number above zero (seconds)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: must be a number above zero")
    return number


def temperature_arg(value: str) -> float:
    """A sampling temperature between 0 and 2."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= number <= 2:
        raise argparse.ArgumentTypeError(f"{value!r}: a temperature is between 0 and 2")
    return number


def port_arg(value: str) -> int:
    """A TCP port (0 picks a free one)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: a port is between 0 and 65535")
    return number


def url_arg(value: str) -> str:
    """An http(s) URL with a host."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL, e.g. https://gateway.example/v1")
    return value.strip()


# --- shared options and output -----------------------------------------------------------------------------------

PROFILES = ["auto", "x402", "token-kiosk", "aisa", "plain"]
PROFILE_HELP = (
    "how the gateway is paid: auto (detect), x402 (a payment per call), token-kiosk (prepaid credit, SIWE keys), "
    "aisa (AISA_API_KEY), plain (an API key, no payment); default auto"
)


def output_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--debug``, on every command."""
    parser.add_argument("--json", action="store_true", help="print JSON on stdout; an error is a JSON object on stderr")
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of an unexpected error"
    )


def ledger_options(parser: argparse.ArgumentParser, *, agent_help: str | None = None) -> None:
    """``--ledger``, ``--agent`` and ``--policy``."""
    parser.add_argument(
        "--ledger",
        default=None,
        metavar="URL",
        help="the ledger: sqlite:///path, redis://host:port/db or memory:// "
        "(default: LLM402_LEDGER, else sqlite:///~/.llm402/ledger.db)",
    )
    parser.add_argument(
        "--agent",
        default=None,
        metavar="NAME",
        help=agent_help
        or "the agent that spends; budgets and receipts are kept per agent (default: the wallet's address; an ENS "
        "name is verified through LLM402_ETH_RPC)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help="a TOML/JSON policy file (default: LLM402_POLICY, else $1 max ticket and $10 per agent per UTC day)",
    )


def gateway_options(parser: argparse.ArgumentParser) -> None:
    """``--base-url`` and ``--profile`` (with the ledger and output options)."""
    parser.add_argument(
        "--base-url",
        required=True,
        type=url_arg,
        metavar="URL",
        help="the gateway's OpenAI base URL, e.g. https://gw/v1",
    )
    parser.add_argument("--profile", default="auto", choices=PROFILES, help=PROFILE_HELP)
    ledger_options(parser)
    output_options(parser)


def load_policy(args: argparse.Namespace) -> Any:
    """The policy the command runs under: ``--policy``, else ``LLM402_POLICY``, else the safe defaults."""
    from .policy import Policy

    path = getattr(args, "policy", None)
    return Policy.from_file(path) if path else Policy.from_env()


def policy_source(args: argparse.Namespace) -> str:
    """Where the policy in force came from, for reports."""
    from .policy import ENV_POLICY

    if getattr(args, "policy", None):
        return f"policy file {args.policy} (--policy)"
    if os.environ.get(ENV_POLICY):
        return f"policy file {os.environ[ENV_POLICY]} ({ENV_POLICY})"
    return f"the safe defaults (no --policy, no {ENV_POLICY})"


def emit_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def with_usd(data: Any) -> Any:
    """A gateway's answer with a ``<name>_usd`` string (six decimals) beside every integer ``<name>_usdc``."""
    from .receipts import usd_string

    if isinstance(data, list):
        return [with_usd(item) for item in data]
    if not isinstance(data, Mapping):
        return data
    shown: dict[str, Any] = {}
    for key, value in data.items():
        shown[key] = with_usd(value)
        if key.endswith("_usdc") and isinstance(value, int) and not isinstance(value, bool):
            shown[key[: -len("_usdc")] + "_usd"] = usd_string(value)
    return shown


def print_rows(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """A table of rows (USD columns shown with ``$``; the atomic ``*_usdc`` twins left to ``--json``)."""
    table = Table(title=title)
    columns = [c for c in (rows[0] if rows else {}) if not str(c).endswith("_usdc")]
    for column in columns:
        table.add_column(str(column).removesuffix("_usd"), justify="right" if column.endswith("_usd") else "left")
    for row in rows:
        table.add_row(
            *("-" if row[c] is None else (f"${row[c]}" if c.endswith("_usd") else str(row[c])) for c in columns)
        )
    console.print(table)


def show(args: argparse.Namespace, title: str, rows: Sequence[Mapping[str, Any]], data: Any = None) -> None:
    """``data`` (or ``rows``) as JSON with ``--json``, else ``rows`` as a table."""
    if args.json:
        emit_json(data if data is not None else list(rows))
    else:
        print_rows(title, rows)


# --- commands ----------------------------------------------------------------------------------------------------


def _sandbox(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .errors import ConfigurationError
    from .sandbox import SandboxConfig, SandboxServer
    from .sandbox.server import serve

    config = SandboxConfig()
    if args.dialect:
        config = replace(config, default_dialect=args.dialect)
    try:
        if not args.json:
            serve(host=args.host, port=args.port, db_path=args.db, config=config, out=sys.stdout)
            return EXIT_OK
        if args.db:
            config = replace(config, db_path=args.db)
        with SandboxServer(config, host=args.host, port=args.port) as server:
            print(
                json.dumps(
                    {
                        "url": server.url,
                        "base_url": f"{server.url}/v1",
                        "host": args.host,
                        "port": server.port,
                        "db": config.db_path,
                        "dialect": config.default_dialect,
                        "network": config.network,
                        "payee": config.payee,
                        "faucet": f"{server.url}/sandbox/faucet",
                    }
                )
            )
            sys.stdout.flush()
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        raise
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Console(stderr=True, highlight=False) if args.json else console, as_json=args.json)
    return EXIT_OK


ENV_SANDBOX_URL = "LLM402_SANDBOX_URL"
DEFAULT_SANDBOX_URL = "http://127.0.0.1:8402"
DEFAULT_FUND_USD = Decimal(5)
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def address_arg(value: str) -> str:
    """An EVM address: ``0x`` and 40 hex digits."""
    text = value.strip()
    if not _ADDRESS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{value!r} is not an address (0x and 40 hex digits)")
    return text


def _keystore_password() -> str:
    """The new keystore's password: ``LLM402_KEYSTORE_PASSWORD``, else asked twice on the terminal."""
    from .errors import ConfigurationError
    from .wallet import ENV_KEYSTORE_PASSWORD

    password = os.environ.get(ENV_KEYSTORE_PASSWORD)
    if password is None:
        if not sys.stdin.isatty():
            raise ConfigurationError(
                f"a keystore needs a password: set {ENV_KEYSTORE_PASSWORD}, or run in a terminal to be asked for one"
            )
        import getpass

        password = getpass.getpass("password for the new keystore: ")
        if getpass.getpass("the same password again: ") != password:
            raise ConfigurationError("the two passwords differ; nothing was written")
    if not password:
        raise ConfigurationError("the keystore password is empty; nothing was written")
    return password


def _write_new_file(path: str, text: str) -> str:
    """Write ``text`` to a file that must not exist yet (mode 0600; missing folders made 0700); its absolute path."""
    from pathlib import Path

    from .errors import ConfigurationError

    file = Path(path).expanduser().absolute()
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{file} exists; a keystore is never overwritten (choose another path)") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return str(file)


def _wallet_new(args: argparse.Namespace) -> int:
    """A fresh key: printed once (as a shell ``export`` line, or JSON), or only written encrypted to ``--keystore``."""
    import shlex

    from .wallet import ENV_KEYSTORE, ENV_PRIVATE_KEY, Wallet

    wallet = Wallet.create()
    if args.keystore:
        password = _keystore_password()
        path = _write_new_file(args.keystore, json.dumps(wallet.encrypt(password)))
        if args.json:
            emit_json({"address": wallet.address, "keystore": path})
        else:
            sys.stdout.write(
                f"# llm402 wallet {wallet.address}, encrypted in {path} (the password is not stored)\n"
                f"export {ENV_KEYSTORE}={shlex.quote(path)}\n"
            )
        return EXIT_OK
    key = wallet.export_private_key()
    if args.json:
        emit_json({"address": wallet.address, "private_key": key})
    else:
        sys.stdout.write(
            f"# llm402 wallet {wallet.address}: the key below spends its funds; keep it secret\n"
            f"export {ENV_PRIVATE_KEY}={key}\n"
        )
    return EXIT_OK


def _sandbox_url_from_env() -> str:
    from .errors import ConfigurationError

    value = os.environ.get(ENV_SANDBOX_URL)
    if not value:
        return DEFAULT_SANDBOX_URL
    try:
        return url_arg(value)
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"{ENV_SANDBOX_URL}: {exc}") from None


def _wallet_fund(args: argparse.Namespace) -> int:
    """Test USDC from a running sandbox's faucet (``POST /sandbox/faucet``) to an address or the configured wallet."""
    import httpx

    from .errors import GatewayError
    from .money import usd_to_atomic
    from .receipts import usd_string
    from .wallet import Wallet

    address = args.address or Wallet.from_env().address
    amount = usd_to_atomic(args.amount if args.amount is not None else DEFAULT_FUND_USD)
    root = (args.sandbox_url or _sandbox_url_from_env()).rstrip("/")
    with httpx.Client(timeout=10.0) as client:
        response = client.post(f"{root}/sandbox/faucet", json={"address": address, "amount": amount})
    if response.status_code == 404:
        raise GatewayError(
            f"{root} has no faucet (POST /sandbox/faucet answered 404): --sandbox-url is where `llm402 sandbox` "
            f"listens, without /v1, e.g. {DEFAULT_SANDBOX_URL}",
            status=404,
            code="not_a_sandbox",
        )
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code != 200 or not isinstance(data, dict) or not isinstance(data.get("balance"), int):
        reason = data.get("message") if isinstance(data, dict) else None
        raise GatewayError(
            f"the faucet at {root} refused: HTTP {response.status_code}: {reason or response.text[:200]}",
            status=response.status_code,
            code="faucet_refused",
        )
    balance = int(data["balance"])
    funded = {
        "address": str(data.get("address") or address),
        "amount": amount,
        "amount_usd": usd_string(amount),
        "balance": balance,
        "balance_usd": usd_string(balance),
        "sandbox_url": root,
    }
    if args.json:
        emit_json(funded)
    else:
        sys.stdout.write(
            f"funded {funded['address']} with ${funded['amount_usd']} of test USDC at {root}; "
            f"balance ${funded['balance_usd']}\n"
        )
    return EXIT_OK


def _wallet(args: argparse.Namespace) -> int:
    if args.action == "new":
        given = [name for name, value in (("ADDRESS", args.address), ("--amount", args.amount)) if value is not None]
        if args.sandbox_url is not None:
            given.append("--sandbox-url")
        if given:
            raise UsageError(f"new takes no {', '.join(given)} (those are for `llm402 wallet fund`)", "llm402 wallet")
        return _wallet_new(args)
    if args.keystore is not None:
        raise UsageError("fund takes no --keystore (that is for `llm402 wallet new`)", "llm402 wallet")
    return _wallet_fund(args)


def _gateway(args: argparse.Namespace, *, wallet: bool = True, ledger: str | None = None) -> Any:
    from .gateway import Gateway
    from .wallet import Wallet

    return Gateway(
        args.base_url,
        wallet=Wallet.from_env() if wallet else None,
        policy=load_policy(args),
        profile=args.profile,
        api_key=getattr(args, "api_key", None),
        ledger=ledger or args.ledger,
        agent=args.agent,
        key_store=getattr(args, "key_store", None),
    )


def _quote(args: argparse.Namespace) -> int:
    from .receipts import iso_time, usd_string

    body: dict[str, Any] = {"model": args.model, "messages": [{"role": "user", "content": args.message}]}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    with _gateway(args, wallet=False, ledger="memory://") as gw:
        quote = gw.quote(body)
    data = quote.to_dict()
    data.update(
        amount_usd=usd_string(quote.amount),
        quoted_at=iso_time(quote.quoted_at),
        valid_until=iso_time(quote.valid_until),
        valid_until_unix=quote.valid_until,
    )
    if args.json:
        emit_json(data)
        return EXIT_OK
    row = {k: v for k, v in data.items() if k not in ("options", "amount", "valid_until_unix", "max_timeout_seconds")}
    upto = " (a ceiling: upto settles the actual cost)" if data.get("scheme") == "upto" else ""
    print_rows(f"quote for {args.model}{upto}", [row])
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    if args.action == "revoke" and args.id is None:
        raise UsageError("revoke needs --id, the key's id from `llm402 keys list`", "llm402 keys")
    with _gateway(args) as gw, gw.credit_account() as account:
        if args.action == "create":
            data = account.create_key(args.label, store=args.key_store)
            shown = {**data, "key": data["key"] if not args.key_store else f"(stored in {args.key_store})"}
            show(args, "new API key (shown once)", [shown])
        elif args.action == "list":
            show(args, "API keys", account.list_keys())
        else:
            show(args, "revoke", [{"id": args.id, "revoked": account.revoke_key(args.id)}])
    return EXIT_OK


def _account(args: argparse.Namespace) -> int:
    from .receipts import receipt_view, usd_string

    with _gateway(args) as gw, gw.credit_account() as account:
        if args.command == "balance":
            data = with_usd(account.balance())
            show(args, "balance", [data], data)
        elif args.command == "usage":
            data = with_usd(account.usage())
            show(args, "usage", data.get("keys", []), data)
        else:
            receipt = account.topup(args.amount)
            payment = receipt.payment
            amount = payment.amount if payment else 0
            row = {
                "amount": amount,
                "amount_usd": usd_string(amount),
                "transaction": payment.transaction if payment else None,
                "status": receipt.status,
            }
            if args.json:
                emit_json([{**row, "receipt": receipt_view(receipt)}])
            else:
                print_rows("top-up", [{k: v for k, v in row.items() if k != "amount"}])
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands)."""
    parser = Parser(
        prog="llm402",
        description="Pay-per-call LLM access for agents: x402 payments, budgets and receipts.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llm402 {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    more = "run `llm402 --help` for the environment variables and exit codes"

    sandbox = sub.add_parser("sandbox", help="run the local reference gateway (test USDC)", epilog=more)
    sandbox.add_argument("--port", type=port_arg, default=8402, help="port to listen on (default 8402; 0: a free one)")
    sandbox.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sandbox.add_argument(
        "--db", default=None, metavar="FILE", help="SQLite file for the sandbox's state (default: in memory)"
    )
    sandbox.add_argument(
        "--dialect", choices=["v2", "v1", "kiosk"], default=None, help="the 402 dialect of the /v1 mount (default v2)"
    )
    output_options(sandbox)
    sandbox.set_defaults(run=_sandbox)
    sandbox.description = "Run the sandbox gateway until Ctrl-C. With --json, one JSON line says where it listens."

    demo = sub.add_parser("demo", help="paid calls through the OpenAI SDK against an embedded sandbox", epilog=more)
    output_options(demo)
    demo.set_defaults(run=_demo)

    wallet = sub.add_parser(
        "wallet",
        help="make a wallet (new), or fund one with test USDC at a running sandbox (fund)",
        epilog=more,
        description="llm402 wallet new: a fresh key, printed once as `export LLM402_PRIVATE_KEY=0x...` (or with "
        "--keystore, only written encrypted). llm402 wallet fund [ADDRESS]: test USDC from the faucet of a running "
        "`llm402 sandbox` to ADDRESS (default: the wallet of LLM402_PRIVATE_KEY or LLM402_KEYSTORE).",
    )
    wallet.add_argument("action", choices=["new", "fund"], help="new: make a key; fund: test USDC from a sandbox")
    wallet.add_argument(
        "address",
        nargs="?",
        type=address_arg,
        default=None,
        help="the address to fund (fund; default: the wallet of LLM402_PRIVATE_KEY or LLM402_KEYSTORE)",
    )
    wallet.add_argument(
        "--keystore",
        default=None,
        metavar="FILE",
        help="new: write an encrypted keystore to FILE (mode 0600, never overwritten) instead of printing the key; "
        "the password comes from LLM402_KEYSTORE_PASSWORD, else it is asked for",
    )
    wallet.add_argument(
        "--amount", type=usd_arg, default=None, metavar="USD", help="fund: USD of test USDC to mint (default 5)"
    )
    wallet.add_argument(
        "--sandbox-url",
        type=url_arg,
        default=None,
        metavar="URL",
        help=f"fund: where `llm402 sandbox` listens (default: {ENV_SANDBOX_URL}, else {DEFAULT_SANDBOX_URL})",
    )
    output_options(wallet)
    wallet.set_defaults(run=_wallet)
    wallet.__class__ = IntermixedParser  # ADDRESS may follow the options (add_parser makes every parser a Parser)

    from .cli_spend import register as register_spend

    register_spend(sub, epilog=more)

    quote = sub.add_parser("quote", help="what a request would cost, without paying", epilog=more)
    quote.add_argument("--model", required=True, help="the model to price")
    quote.add_argument("--message", default="hello", help="the user message to price (default: hello)")
    quote.add_argument("--max-tokens", type=positive_int, default=None, help="the completion bound to price")
    gateway_options(quote)
    quote.set_defaults(run=_quote)

    keys = sub.add_parser("keys", help="API keys of a credit gateway (signed in with the wallet, SIWE)", epilog=more)
    keys.add_argument("action", choices=["create", "list", "revoke"], help="create a key, list keys, or revoke one")
    keys.add_argument("--label", default="llm402", help="the new key's label (create; default llm402)")
    keys.add_argument("--id", default=None, help="the key to revoke (revoke; ids from `llm402 keys list`)")
    keys.add_argument(
        "--key-store", default=None, metavar="TARGET", help="keep a created key in env:NAME or a file (mode 0600)"
    )
    gateway_options(keys)
    keys.set_defaults(run=_keys)

    for name, text in (
        ("balance", "available credit on a credit gateway"),
        ("usage", "credit usage per API key"),
        ("topup", "buy credit with an x402 payment (within the policy's top-up limits)"),
    ):
        p = sub.add_parser(name, help=text, epilog=more)
        if name == "topup":
            p.add_argument("--amount", required=True, type=usd_arg, metavar="USD", help="USD to buy, e.g. 5 or 0.25")
        p.add_argument(
            "--api-key", default=None, help="an API key of the gateway (default: one minted with the wallet)"
        )
        if name == "usage":
            p.add_argument("--key-store", default=None, metavar="TARGET", help="use the key kept in env:NAME or a file")
        gateway_options(p)
        p.set_defaults(run=_account)

    from .cli_router import register

    register(sub, epilog=more)  # chat, vision, models, compare: the router skill's CLI surface
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: the exit code (see `EXIT_CODES`)."""
    return run(build_parser, argv)


if __name__ == "__main__":
    from llm402.cli import main as entry  # the package's module, not a second copy named __main__

    sys.exit(entry())
