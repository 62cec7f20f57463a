"""`llava-jax`: one entry point, one module per command.

Expected errors (bad input the user can fix) print one line, `llava-jax: error: <message>`,
and exit 2; `--verbose` adds the traceback. Anything else is a bug and keeps Python's
traceback and exit status 1. Ctrl-C exits 130, wherever it lands (`interrupt.py`).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from llava_jax.cli import (
    CommandError,
    chat,
    convert,
    data,
    eval,  # noqa: A004 (the module, not the builtin)
    export,
    generate,
    init,
    instruct,
    noise,
    plan,
    selfcheck,
    serve,
    train,
)
from llava_jax.cli.failures import hide_echoes
from llava_jax.cli.interrupt import stoppable

PROG = "llava-jax"

# A new command is a module with `add_parser(subparsers)` and one entry here.
COMMANDS = (
    selfcheck,
    convert,
    generate,
    chat,
    init,
    data,
    train,
    export,
    plan,
    eval,
    instruct,
    serve,
)

# ValueError covers CheckpointError and ConfigError; OSError covers FileNotFoundError,
# PermissionError, a full disk.
EXPECTED_ERRORS = (CommandError, ValueError, OSError)
EXIT_ERROR = 2  # as argparse exits for a usage error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _Parser(argparse.ArgumentParser):
    """Every (sub)parser accepts -v/--verbose, so it may follow the command too.

    The default is SUPPRESS so that a subparser does not overwrite a `--verbose` given
    before the command (argparse copies subparser defaults over the parent's values).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the traceback of an error",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="LLaVA, LLaVA-NeXT and LLaVA-OneVision in JAX: convert, check, run.",
    )
    # Nested subparsers inherit _Parser (add_subparsers defaults parser_class to type(self)).
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f"{error.filename}: {error.strerror}"  # not "[Errno 2] ...: 'path'"
    else:
        message = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _is_override(arg: str) -> bool:
    return arg.startswith("--config.") and "=" in arg


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command.

    Args:
      argv: the arguments after the program name; default `sys.argv[1:]`.

    Returns:
      The exit status: 0 on success, 2 for an expected error, 130 on Ctrl-C, or what the
      command returned (selfcheck: 1 when a check fails).
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # `--config.a.b=value` overrides, for the commands that take a recipe config.
        if extra and not (hasattr(args, "overrides") and all(_is_override(a) for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if hasattr(args, "overrides"):
            args.overrides = extra
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    verbose = getattr(args, "verbose", False)
    if not verbose:
        hide_echoes()
    try:
        noise.quiet()
        with stoppable():
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as e:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
