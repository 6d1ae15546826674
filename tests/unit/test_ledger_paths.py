"""Where a SQLite ledger may be created: only the default folder ``~/.llm402`` is made; a URL naming any other
missing folder is refused with a ``ConfigurationError`` that names it (``sqlite:///a/b.db`` is ``/a/b.db``, and
used to create ``/a``)."""

from __future__ import annotations

import re
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import pytest

from llm402.budget import default_ledger_url, open_ledger
from llm402.budget.sqlite import SqliteLedger
from llm402.errors import ConfigurationError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.delenv("LLM402_LEDGER", raising=False)
    return folder


def test_a_url_naming_a_missing_folder_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent_dir"
    with pytest.raises(ConfigurationError, match=re.escape(f"{missing / 'sub'} does not exist")):
        open_ledger(f"sqlite:///{missing}/sub/x.db")
    assert not missing.exists()


def test_a_relative_looking_url_does_not_create_a_folder_at_the_root() -> None:
    """The reported case: ``sqlite:///nonexistent_dir/sub/x.db`` names ``/nonexistent_dir/sub/x.db``."""
    top = f"llm402-test-{uuid.uuid4().hex[:12]}"
    assert not Path("/", top).exists()
    with pytest.raises(ConfigurationError, match=re.escape(f"/{top}/sub does not exist")):
        open_ledger(f"sqlite:///{top}/sub/x.db")
    assert not Path("/", top).exists()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(ConfigurationError, match="is not a folder"):
        SqliteLedger(tmp_path / "plain" / "x.db")


def test_an_existing_folder_gets_a_private_file(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path}/x.db")
    ledger.close()
    assert stat.S_IMODE((tmp_path / "x.db").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []


def test_the_default_ledger_creates_its_folder_private_to_the_user(home: Path) -> None:
    assert default_ledger_url() == f"sqlite:///{home}/.llm402/ledger.db"
    ledger = open_ledger()
    ledger.close()
    folder = home / ".llm402"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "ledger.db").stat().st_mode) == 0o600
    with sqlite3.connect(folder / "ledger.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    open_ledger().close()  # the second time the folder exists


def test_the_default_folder_spelled_with_a_tilde_is_created_too(home: Path) -> None:
    open_ledger("sqlite:///~/.llm402/other.db").close()
    assert (home / ".llm402" / "other.db").is_file()


def test_only_the_default_folder_itself_is_created(home: Path) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"{home / '.llm402' / 'sub'} does not exist")):
        open_ledger("sqlite:///~/.llm402/sub/x.db")
    assert not (home / ".llm402").exists()


def test_a_missing_home_is_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "gone"
    monkeypatch.setenv("HOME", str(gone))
    monkeypatch.delenv("LLM402_LEDGER", raising=False)
    with pytest.raises(ConfigurationError, match=re.escape(f"its parent {gone} does not exist")):
        open_ledger()
    assert not gone.exists()


def test_the_sqlite_url_may_trade_power_cut_durability_for_speed(tmp_path: Path) -> None:
    from llm402.budget import open_ledger
    from llm402.errors import ConfigurationError

    fast = open_ledger(f"sqlite:///{tmp_path}/fast.db?synchronous=NORMAL")
    durable = open_ledger(f"sqlite:///{tmp_path}/durable.db")
    assert fast._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # type: ignore[attr-defined]
    assert durable._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # type: ignore[attr-defined]  # FULL
    with pytest.raises(ConfigurationError, match="unknown sqlite ledger URL option"):
        open_ledger(f"sqlite:///{tmp_path}/x.db?fsync=off")


def test_processes_opening_a_new_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    import subprocess
    import sys

    opener = (
        "import os, sys, time\n"
        "from llm402.budget import open_ledger\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.0005)\n"  # imported: now all open at the same moment
        "open_ledger('sqlite:///' + sys.argv[1]).close()\n"
    )
    for round_ in range(6):  # switching a new file to WAL raced ("database is locked" in 4 of 15 pairs)
        path, go = tmp_path / f"race{round_}.db", tmp_path / f"go{round_}"
        children = [subprocess.Popen([sys.executable, "-c", opener, str(path), str(go)]) for _ in range(4)]
        time.sleep(0.5)
        go.touch()
        assert [child.wait(timeout=60) for child in children] == [0, 0, 0, 0]
