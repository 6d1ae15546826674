"""``python -m llm402.sandbox [--port N] [--db PATH] [--host H] [--dialect v2|v1|kiosk]``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .config import DIALECTS, SandboxConfig


def build_parser() -> argparse.ArgumentParser:
    """The sandbox's argument parser."""
    parser = argparse.ArgumentParser(
        prog="llm402 sandbox", description="Run the llm402 local reference gateway (test USDC, scripted models)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8402, help="port to bind (default 8402; 0 picks a free one)")
    parser.add_argument("--db", default=None, help="SQLite file for the sandbox's state (default: in memory)")
    parser.add_argument("--dialect", choices=DIALECTS, default=None, help="402 dialect of the plain /v1 mount")
    parser.add_argument("--faults", default=None, help="default fault spec, same syntax as X-Sandbox-Fault")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and serve until interrupted."""
    from .server import serve

    args = build_parser().parse_args(argv)
    config = SandboxConfig()
    if args.dialect:
        config = replace(config, default_dialect=args.dialect)
    if args.faults:
        config = replace(config, faults=args.faults)
    try:
        serve(host=args.host, port=args.port, db_path=args.db, config=config)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"llm402 sandbox: cannot listen on {args.host}:{args.port}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
