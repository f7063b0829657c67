"""What every ``fraccompile`` command shares: the typer app the commands register on, the console,
the options of commands that load a model file, and the one-line error handling. Its own module
so that :mod:`fraccompile.cli` and :mod:`fraccompile.cli_kernels` both import it and neither
imports the other's commands back (no import cycle)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import FracCompileError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="FracTrain quantized training as a PyTorch graph compiler.",
)
# A wide console when piped, so the site table is not folded into unreadable cells.
console = Console(width=None if sys.stdout.isatty() else 160)

# options every command that loads a model file takes
ModelArg = Annotated[str, typer.Argument(metavar="PATH.py[:NAME]")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="FracConfig TOML file")]
DtypeOpt = Annotated[str, typer.Option(help="input dtype: auto, float32 or int64")]


def _one_line_errors(fn):
    """Turn a FracCompileError (bad input) into one actionable line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FracCompileError as err:
            print(f"fraccompile: error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _writable(path: Path, option: str) -> None:
    """Refuse an output directory that cannot be written, before any long work."""
    from .errors import ConfigError
    from .fileio import dir_problem

    problem = dir_problem(path)
    if problem:
        raise ConfigError(f"{option} {path}: {problem}")
