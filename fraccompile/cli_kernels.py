"""The kernel-tooling commands of ``fraccompile``, ``tune`` and ``export`` (docs/tuning-export.md),
registered on :data:`fraccompile.cli_common.app` (:mod:`fraccompile.cli` imports this module).
What they do is in :mod:`fraccompile.kernel_tools` and :mod:`fraccompile.targets`; this module
reads the options and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_common import ConfigOpt, DtypeOpt, ModelArg, _one_line_errors, _writable, app, console

KernelShapeOpt = Annotated[str, typer.Option(help="example input shape, e.g. 128,3,32,32")]
TargetOpt = Annotated[str, typer.Option(help="cpu or cuda")]

_TUNE_COLUMNS = (
    "G,M,N,K",
    "sites",
    "default tile",
    "tuned tile",
    "default GOPS",
    "tuned GOPS",
    "speedup",
    "trials",
    "seconds",
    "",
)


@app.command()
@_one_line_errors
def tune(
    model_spec: ModelArg,
    input_shape: KernelShapeOpt,
    db: Annotated[Path, typer.Option(help="tuning database directory (reused and extended)")] = Path(
        "fraccompile_tuning"
    ),
    target: TargetOpt = "cpu",
    trials: Annotated[int, typer.Option(min=1, help="tiles measured per GEMM problem")] = 16,
    time_budget: Annotated[Optional[float], typer.Option(help="stop after this many seconds")] = None,
    rpc: Annotated[
        Optional[str], typer.Option(help="measure on an RPC tracker's server: HOST:PORT:KEY")
    ] = None,
    config: ConfigOpt = None,
    dtype: DtypeOpt = "auto",
    seed: Annotated[int, typer.Option(help="seed of the tile sampling")] = 0,
) -> None:
    """Tune every distinct integer GEMM of a compiled model for this machine (a measured search
    over the kernel template's tiles); results go to --db, which later runs reuse."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .errors import ConfigError
    from .kernel_tools import kernel_model, open_tuning_db, require_tvm, tuned_gemm_cells

    if target == "cuda":
        raise ConfigError(
            "--target cuda: tuning measures kernels on an NVIDIA GPU through "
            "TVM's runtime, and the apache-tvm wheel has no CUDA runtime; the "
            "CUDA kernels use their default tiles (see the README)"
        )
    require_tvm()
    from .targets.tools.export import record
    from .targets.tools.tuning import LocalRunner, RPCRunner, tune

    _writable(db, "--db")
    database = open_tuning_db(db, rpc)
    fmodel, x = kernel_model(model_spec, input_shape, config, dtype, target)
    rec = record(fmodel, x)
    problems = sorted(rec.problems)
    runner = RPCRunner(rpc) if rpc else LocalRunner()
    console.print(
        f"tuning {len(problems)} GEMM problems of {model_spec} ({trials} trials each, "
        f"measured {'on ' + rpc if rpc else 'here'}; database {db})"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("tuning", total=len(problems))

        def progress(i, result):
            r = result.record
            bar.update(
                task,
                advance=1,
                description=f"G{r.problem[0]} M{r.problem[1]} "
                f"N{r.problem[2]} K{r.problem[3]}: {r.gops:.0f} GOPS",
            )

        results = tune(problems, database, runner, trials, time_budget, seed, progress)
    table = Table(title=f"tuned GEMMs ({database.path})")
    for col in _TUNE_COLUMNS:
        table.add_column(
            col, justify="right" if "GOPS" in col or col in ("speedup", "trials", "seconds") else "left"
        )
    for res in results:
        r = res.record
        sites = sorted({s for s, _ in rec.problems[tuple(r.problem)] if s})
        table.add_row(
            *tuned_gemm_cells(r, sites),
            f"{r.default_gops:.0f}",
            f"{r.gops:.0f}",
            f"{r.speedup:.2f}x",
            str(r.trials),
            f"{r.seconds:.1f}",
            "reused" if res.reused else "new",
        )
    console.print(table)
    new = [r for r in results if not r.reused]
    skipped = len(problems) - len(results)
    console.print(
        f"{len(new)} tuned, {len(results) - len(new)} reused from the database"
        + (f", {skipped} left at the default tile (time budget)" if skipped else "")
    )


@app.command()
@_one_line_errors
def export(
    model_spec: ModelArg,
    input_shape: KernelShapeOpt,
    out: Annotated[Path, typer.Option(help="output directory (library + manifest.json)")] = Path(
        "fraccompile_kernels"
    ),
    target: TargetOpt = "cpu",
    db: Annotated[Optional[Path], typer.Option(help="tuning database to take tiles from")] = None,
    config: ConfigOpt = None,
    dtype: DtypeOpt = "auto",
) -> None:
    """Build every kernel a compiled model needs into one shared library plus manifest.json;
    train on it with FracConfig(backend="tvm", kernels=OUT)."""
    from .kernel_tools import kernel_model, open_tuning_db, require_tvm

    require_tvm()
    from .targets.tools.export import export as export_kernels

    _writable(out, "--out")
    database = open_tuning_db(db) if db is not None else None
    fmodel, x = kernel_model(model_spec, input_shape, config, dtype, target)
    manifest = export_kernels(fmodel, x, out, target=target, tuning=database, model=model_spec)
    info = manifest["targets"][target]
    kernels = [k for k in manifest["kernels"] if k["target"] == target]
    where = info.get("host") or ", ".join(info.get("archs", []))
    console.print(f"exported {len(kernels)} {target} kernels for {where}")
    console.print(f"wrote {out / info['library']}")
    console.print(f"wrote {out / 'manifest.json'}")
