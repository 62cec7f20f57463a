"""The `llava-jax` command line.

`main.py` builds the parser from a list of command modules. A command module has one job:
`add_parser(subparsers)` adds its subparser(s) and sets `run` (argparse.Namespace -> exit
code) as a parser default. Command modules import the heavy libraries (jax, torch,
transformers) inside their run functions, so `--help` and argument errors stay instant.
"""


class CommandError(Exception):
    """An error the user can act on (a missing file, a missing extra). Printed as one line."""
