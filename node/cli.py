"""`gguf-swarm`: the one console script. Fragmenter commands and node commands."""

from __future__ import annotations

import argparse
import sys

from fragmenter.cli import add_fragmenter_commands, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gguf-swarm", description="Move GGUF models between machines, peer to peer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_fragmenter_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, args.func)


if __name__ == "__main__":
    sys.exit(main())
