"""The ``llm402`` command."""

from __future__ import annotations

import argparse
import sys


def _sandbox(args: argparse.Namespace) -> int:
    from .sandbox.__main__ import main as sandbox_main

    argv = ["--port", str(args.port), "--host", args.host]
    if args.db:
        argv += ["--db", args.db]
    if args.dialect:
        argv += ["--dialect", args.dialect]
    return sandbox_main(argv)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands)."""
    parser = argparse.ArgumentParser(prog="llm402", description="Pay-per-call LLM access for agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    sandbox = sub.add_parser("sandbox", help="run the local reference gateway")
    sandbox.add_argument("--port", type=int, default=8402)
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--db", default=None, help="SQLite file for the sandbox's state (default: in memory)")
    sandbox.add_argument("--dialect", choices=["v2", "v1", "kiosk"], default=None)
    sandbox.set_defaults(run=_sandbox)
    demo = sub.add_parser("demo", help="paid calls through the OpenAI SDK against the embedded sandbox")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
