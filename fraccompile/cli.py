"""The ``fraccompile`` command line (typer). Bad input prints one line on stderr and exits 2."""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import FracCompileError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FracTrain quantized training as a PyTorch graph compiler.")
# A wide console when piped, so the site table is not folded into unreadable cells.
console = Console(width=None if sys.stdout.isatty() else 160)


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


def _load_config(path: Optional[Path], leaf: list[str], capture: Optional[str]):
    from .config import FracConfig

    config = FracConfig.load(path) if path is not None else FracConfig()
    changes = {}
    if leaf:
        changes["leaf_modules"] = tuple(config.leaf_modules) + tuple(leaf)
    if capture:
        changes["capture"] = capture
    return config.replace(**changes) if changes else config


@app.command()
@_one_line_errors
def transform(
    model_spec: Annotated[str, typer.Argument(metavar="PATH.py[:NAME]",
                                              help="model file; NAME is a class or factory")],
    input_shape: Annotated[str, typer.Option(help="example input shape, e.g. 8,3,32,32")],
    config: Annotated[Optional[Path], typer.Option(help="FracConfig TOML file")] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("fraccompile_out"),
    leaf: Annotated[list[str], typer.Option(help="module class/path kept opaque (repeatable)")] = [],  # noqa: B006
    capture: Annotated[Optional[str], typer.Option(help="auto, fx or export")] = None,
    dtype: Annotated[str, typer.Option(help="input dtype: auto, float32 or int64")] = "auto",
) -> None:
    """Compile a model and write transformed.py, graph.json and report.md."""
    from .api import compile as frac_compile
    from .loading import example_input, load_model, parse_shape
    from .report import sites_table, write_transform_outputs

    shape = parse_shape(input_shape)
    cfg = _load_config(config, leaf, capture)
    model = load_model(model_spec)
    fmodel = frac_compile(copy.deepcopy(model), example_input(model, shape, dtype), cfg)
    console.print(sites_table(fmodel, title=f"{model_spec}: {type(model).__name__} "
                                            f"(captured with torch.{fmodel.meta['frac_capture']})"))
    console.print(fmodel.cost().summary())
    for path in write_transform_outputs(fmodel, out, model_spec):
        console.print(f"wrote {path}")


@app.command()
@_one_line_errors
def demo(
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 80,
    batch_size: Annotated[int, typer.Option(min=1, help="batch size")] = 64,
    a: Annotated[int, typer.Option(help="activation bits (0 = fp32)")] = 8,
    w: Annotated[int, typer.Option(help="weight bits")] = 8,
    g: Annotated[int, typer.Option(help="gradient bits")] = 8,
    scheme: Annotated[str, typer.Option(help="sbm or symmetric")] = "sbm",
) -> None:
    """Compile the bundled ResNet-20 and train it a few steps on the bundled CIFAR-10 subset."""
    from .config import FracConfig
    from .demo import run_demo

    run_demo(steps, batch_size, FracConfig(a=a, w=w, g=g, scheme=scheme), console=console)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
