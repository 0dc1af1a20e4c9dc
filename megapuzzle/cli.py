"""`megapuzzle <command>`: one subcommand per pipeline stage.

Each command lives in its own module exposing `add_cli_args(parser)` and `run_cli(args)`;
modules are imported only when their command runs, so `megapuzzle --help` stays instant
(importing megatron.core takes seconds).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megapuzzle.stages import commands

# command -> (module, one-line help): the stage registry's commands, then the other tools
COMMANDS: dict[str, tuple[str, str]] = commands()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megapuzzle",
        description="Puzzle (arXiv 2411.19146) on Megatron-core: turn a Llama parent into a faster "
                    "heterogeneous child under a hardware budget.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from megapuzzle import __version__
    return f"megapuzzle {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help / --version exit here; an unknown command errors (exit 2)
        return 2
    name = argv[0]
    from megapuzzle import logs

    logs.setup()  # stdlib logging: megapuzzle's lines on stdout, rank 0 only
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"megapuzzle {name}", description=COMMANDS[name][1])
    module.add_cli_args(sub)
    args = sub.parse_args(argv[1:])
    return run_guarded(module.run_cli, args, prog=f"megapuzzle {name}")


def run_guarded(fn, args, prog: str) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    from megapuzzle.arch import ArchitectureError
    from megapuzzle.errors import UserError

    try:
        rc = fn(args)
        return 0 if rc is None else int(rc)
    except (UserError, ArchitectureError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"{prog}: error: {e.filename or e}: no such file; check the path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
