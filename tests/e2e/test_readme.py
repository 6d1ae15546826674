"""README.md as a reader runs it (issue 19.3), against a real sandbox.

The reader's first steps are done for real: `llm402 wallet new --json` makes the key and `llm402 wallet fund` funds it
at the session's sandbox, then every Python block runs as written, in a process of its own per ``##`` section: the
first section with Python blocks (the setup: ``wallet``, ``gw``, ``SANDBOX``) and then that section's blocks, in order,
in one namespace. The environment is the one the README's first steps leave: ``LLM402_PRIVATE_KEY``,
``LLM402_LEDGER`` (a temporary SQLite file), ``LLM402_SANDBOX_URL`` (the sandbox, on a free port), an empty HOME.

A block whose fence follows ``<!-- runs in: openai3 -->`` needs packages only CI's openai-3 environment has (the
OpenAI Agents SDK, PydanticAI, the Anthropic SDK): there this same file runs those blocks (after the setup) and only
those. Elsewhere every unmarked block runs. Bash blocks are not run, but every ``llm402 ...`` command in them must
parse (and its subcommand's ``--help`` exit 0). The Configuration section lists every environment variable llm402
reads.

Run as a script (``python test_readme.py SECTION ENVIRONMENT``) it is the runner the tests start.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from llm402 import Wallet
from llm402.cli import build_parser
from llm402.sandbox import SandboxServer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
ENVIRONMENTS = ("default", "openai3")
MARK = re.compile(r"<!--\s*runs in:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
BLOCK_TIMEOUT = 240


def current_environment() -> str:
    """``openai3`` where openai 3.x is installed (CI's second environment), else ``default``."""
    try:
        major = int(metadata.version("openai").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return "default"
    return "openai3" if major >= 3 else "default"


@dataclass(frozen=True)
class Block:
    """A fenced block: its section (the ``##`` heading above it), language, first code line and environment."""

    section: str
    lang: str
    line: int
    code: str
    runs_in: str

    def source(self) -> str:
        """The code padded so a traceback's ``README.md, line N`` is the README's line."""
        return "\n" * (self.line - 1) + self.code


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of the README, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, previous, i = "", "", 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            end = i + 1
            while end < len(lines) and not lines[end].startswith(marker):
                end += 1
            mark = MARK.search(previous)
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(section, lang, i + 2, code, mark.group(1) if mark else "default"))
            previous, i = "", end + 1
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip():
            previous = line
        i += 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for b in read_blocks(README.read_text()) if b.lang in ("python", "py")]


def setup_section(blocks: list[Block]) -> str:
    """The first section with Python blocks: every other section's blocks start from the names it defines."""
    return blocks[0].section


def sections_for(environment: str) -> list[str]:
    """The sections with a block that runs in ``environment`` (the setup section first, in every environment)."""
    blocks = python_blocks()
    setup = setup_section(blocks)
    found = [setup]
    for block in blocks:
        if block.runs_in == environment and block.section not in found:
            found.append(block.section)
    return found


def run_section(title: str, environment: str) -> None:
    """The runner: the setup section's blocks, then ``title``'s blocks for ``environment``, in one namespace."""
    blocks = python_blocks()
    setup = setup_section(blocks)
    chosen = [b for b in blocks if b.section == setup]
    if title != setup:
        chosen += [b for b in blocks if b.section == title and b.runs_in == environment]
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for block in chosen:
        print(f"--- README.md line {block.line} ({block.section})", flush=True)
        exec(compile(block.source(), str(README), "exec"), namespace)  # the README's own code


# --- the tests ---------------------------------------------------------------------------------------------------

ENVIRONMENT = current_environment()
CLI = [sys.executable, "-m", "llm402.cli"]


def cli(*argv: str, env: dict[str, str]) -> Any:
    """The command's JSON output (it succeeded and said nothing on stderr)."""
    done = run_cli(*argv, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return json.loads(done.stdout)


@dataclass(frozen=True)
class Reader:
    """A reader's shell after the README's first steps: its environment and working folder."""

    env: dict[str, str]
    folder: Path


@pytest.fixture(scope="module")
def reader(sandbox: SandboxServer, tmp_path_factory: pytest.TempPathFactory) -> Reader:
    """A new wallet (``llm402 wallet new --json``), funded at the sandbox (``llm402 wallet fund``); a ledger file."""
    folder = tmp_path_factory.mktemp("reader")
    env = {**os.environ, "LLM402_SANDBOX_URL": sandbox.url, "LLM402_LEDGER": f"sqlite:///{folder}/ledger.db"}
    made = cli("wallet", "new", "--json", env=env)
    assert set(made) == {"address", "private_key"}
    env["LLM402_PRIVATE_KEY"] = made["private_key"]
    funded = cli("wallet", "fund", "--amount", "5", "--json", env=env)
    assert funded["address"] == made["address"]
    assert funded["balance"] == funded["amount"] == 5_000_000
    return Reader(env, folder)


@pytest.mark.parametrize("title", sections_for(ENVIRONMENT))
def test_python_blocks_run_as_written(title: str, reader: Reader) -> None:
    """Each section's blocks, after the setup section's, in a fresh interpreter (the otel block's global tracer
    provider and the blocks' clients stay out of this process)."""
    done = subprocess.run(
        [sys.executable, __file__, title, ENVIRONMENT],
        env=reader.env,
        cwd=reader.folder,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"section {title!r} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"


def test_every_python_block_runs_somewhere() -> None:
    """A marker names a known environment, the setup runs everywhere, and marked blocks are run by CI."""
    blocks = python_blocks()
    assert blocks, "README.md has no Python blocks"
    for block in blocks:
        assert block.runs_in in ENVIRONMENTS, f"README.md line {block.line}: unknown environment {block.runs_in}"
    setup = setup_section(blocks)
    assert all(b.runs_in == "default" for b in blocks if b.section == setup), "the setup section runs everywhere"
    if any(b.runs_in == "openai3" for b in blocks):
        runs = re.findall(r"^\.venv-openai3/bin/pytest (?:.*\\\n)*.*$", CI_RUN.read_text(), re.MULTILINE)
        assert any("tests/e2e/test_readme.py" in run for run in runs), ".ci/run runs them in the openai-3 venv"


# --- the first steps: llm402 wallet new / fund ------------------------------------------------------------------


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv], env=env, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL
    )


def test_wallet_new_prints_an_export_line_a_shell_can_eval(tmp_path: Path) -> None:
    done = run_cli("wallet", "new", env=dict(os.environ))
    assert done.returncode == 0 and done.stderr == ""
    comment, export = done.stdout.splitlines()
    address = re.fullmatch(r"# llm402 wallet (0x[0-9a-fA-F]{40}): .*", comment)
    key = re.fullmatch(r"export LLM402_PRIVATE_KEY=(0x[0-9a-f]{64})", export)
    assert address and key
    shell = subprocess.run(
        ["bash", "-c", 'eval "$(cat)" && printf %s "$LLM402_PRIVATE_KEY"'],
        input=done.stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == key.group(1)
    assert Wallet.from_key(key.group(1)).address == address.group(1)


def test_wallet_new_keystore_is_encrypted_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "wallet.json"
    env = {**os.environ, "LLM402_KEYSTORE_PASSWORD": "correct horse"}
    done = run_cli("wallet", "new", "--keystore", str(path), "--json", env=env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown == {"address": shown["address"], "keystore": str(path)}
    assert path.stat().st_mode & 0o777 == 0o600
    wallet = Wallet.from_env({"LLM402_KEYSTORE": str(path), "LLM402_KEYSTORE_PASSWORD": "correct horse"})
    assert wallet.address == shown["address"]
    key = wallet.export_private_key()
    assert key not in done.stdout + done.stderr and key[2:] not in done.stdout + done.stderr
    before = path.read_bytes()
    again = run_cli("wallet", "new", "--keystore", str(path), env=env)
    assert again.returncode == 3 and "never overwritten" in again.stderr and again.stdout == ""
    assert path.read_bytes() == before
    no_password = {k: v for k, v in env.items() if k != "LLM402_KEYSTORE_PASSWORD"}
    refused = run_cli("wallet", "new", "--keystore", str(tmp_path / "other.json"), env=no_password)
    assert refused.returncode == 3 and "LLM402_KEYSTORE_PASSWORD" in refused.stderr
    assert not (tmp_path / "other.json").exists()


def test_wallet_fund_errors_are_one_line(sandbox: SandboxServer) -> None:
    env = dict(os.environ)
    address = Wallet.create().address
    funded = run_cli("wallet", "fund", "--amount", "0.25", address, "--sandbox-url", sandbox.url, env=env)
    assert funded.returncode == 0 and "$0.250000" in funded.stdout, funded.stderr
    not_root = run_cli("wallet", "fund", address, "--sandbox-url", f"{sandbox.url}/v1", env=env)
    assert not_root.returncode == 5 and not_root.stderr.count("\n") == 1 and "without /v1" in not_root.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    refused = run_cli("wallet", "fund", address, "--sandbox-url", closed, "--json", env=env)
    assert refused.returncode == 6 and json.loads(refused.stderr)["error"]["code"] == "connection_refused"
    no_wallet = run_cli("wallet", "fund", "--sandbox-url", sandbox.url, env=env)
    assert no_wallet.returncode == 3 and "LLM402_PRIVATE_KEY" in no_wallet.stderr
    bad = run_cli("wallet", "fund", "0x12", env=env)
    assert bad.returncode == 2 and "not an address" in bad.stderr


# --- bash: every llm402 command parses --------------------------------------------------------------------

COMMAND = re.compile(r"(?:^|(?<=[\s(\"';&|]))(?:[\w./-]*/)?llm402((?:[ \t]+[^\s|;&)#>\"]+)*)")


def bash_commands() -> list[tuple[int, list[str]]]:
    """``llm402 ...`` in bash blocks (comments, pipes and redirections cut): (README line, argv)."""
    found: list[tuple[int, list[str]]] = []
    for block in read_blocks(README.read_text()):
        if block.lang not in ("bash", "sh", "shell", "console"):
            continue
        for offset, line in enumerate(block.code.splitlines()):
            code = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
            for match in COMMAND.finditer(code):
                found.append((block.line + offset, shlex.split(match.group(1))))
    return found


def test_bash_blocks_llm402_commands_parse() -> None:
    commands = bash_commands()
    assert any(argv[:2] == ["wallet", "new"] for _, argv in commands), "the README shows llm402 wallet new"
    assert any(argv[:2] == ["wallet", "fund"] for _, argv in commands), "the README shows llm402 wallet fund"
    for line, argv in commands:
        where = f"README.md line {line}: llm402 {shlex.join(argv)}"
        if argv[:1] not in (["--help"], ["--version"]):
            try:
                build_parser().parse_args(argv)
            except BaseException as exc:  # UsageError, SystemExit
                raise AssertionError(f"{where} does not parse: {exc}") from exc
        subcommand = [word for word in argv[:1] if not word.startswith("-")]
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
            build_parser().parse_args([*subcommand, "--help"])
        assert done.value.code == 0, where


# --- configuration: every environment variable ------------------------------------------------------------

NOT_VARIABLES = {"LLM402_DUPLICATE", "LLM402_MISSING", "LLM402_ROLLED_BACK"}  # the Redis scripts' error replies


def variables_read_by_llm402() -> set[str]:
    """Every ``LLM402_*`` / ``AISA_*`` string constant in the package's source (the names it reads)."""
    names: set[str] = set()
    for path in (ROOT / "src" / "llm402").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"(LLM402|AISA)_[A-Z0-9_]+", node.value)
            ):
                names.add(node.value)
    return names - NOT_VARIABLES


def configuration_table() -> str:
    text = README.read_text()
    start = text.index("\n## Configuration\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_configuration_documents_every_environment_variable() -> None:
    names = variables_read_by_llm402()
    assert {"LLM402_PRIVATE_KEY", "LLM402_LEDGER", "LLM402_SANDBOX_URL", "AISA_API_KEY"} <= names
    section = configuration_table()
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {m for row in rows for m in re.findall(r"`((?:LLM402|AISA)_[A-Z0-9_]+)`", row.split("|")[1])}
    assert names <= documented, f"missing from README's Configuration table: {sorted(names - documented)}"
    assert documented <= names | {"NO_COLOR"}, f"documented but never read: {sorted(documented - names)}"


if __name__ == "__main__":
    run_section(sys.argv[1], sys.argv[2])
