"""The ``fraccompile`` command line (typer). Bad input prints one line on stderr and exits 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .cli_common import (  # noqa: F401  (app and console: importable from here too)
    ConfigOpt,
    DtypeOpt,
    ModelArg,
    _one_line_errors,
    _writable,
    app,
    console,
)
from .errors import FracCompileError
from .meta_keys import GM_CAPTURE

# FracConfig fields that `transform` and `train` both take from the command line
BackendOpt = Annotated[
    Optional[str], typer.Option(help="auto (default: tvm where it runs), tvm (integer kernels) or reference")
]
SchemeOpt = Annotated[Optional[str], typer.Option(help="sbm or symmetric")]
WeightScaleOpt = Annotated[
    Optional[str],
    typer.Option(
        help="gemm (default: per output channel, and again per input channel for the error "
        "backprop), channel (per output channel for every GEMM, FracTrain's) or tensor"
    ),
]
RoundingNoiseOpt = Annotated[
    Optional[str],
    typer.Option(help="stochastic rounding noise: counter (a hash, default) or torch (torch.rand)"),
]
RecomputeOpt = Annotated[
    Optional[str],
    typer.Option(
        help="tvm: none, activations (default) or norms: recomputed from int8 codes in backward "
        "instead of kept in fp32"
    ),
]
RecomputeBudgetOpt = Annotated[
    Optional[float],
    typer.Option(
        help="tvm, with --recompute activations or norms: fraction (0..1) of what backward would keep "
        "for them unfused that it may keep instead of recomputing (the costliest to recompute first)"
    ),
]
# the FracConfig fields above, which `transform` and `train` take as options of the same name
CONFIG_OPTIONS = ("backend", "scheme", "weight_scale", "rounding_noise", "recompute", "recompute_budget")


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
    model_spec: Annotated[
        str, typer.Argument(metavar="PATH.py[:NAME]", help="model file; NAME is a class or factory")
    ],
    input_shape: Annotated[str, typer.Option(help="example input shape, e.g. 8,3,32,32")],
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("fraccompile_out"),
    leaf: Annotated[list[str], typer.Option(help="module class/path kept opaque (repeatable)")] = [],  # noqa: B006
    capture: Annotated[Optional[str], typer.Option(help="auto, fx or export")] = None,
    dtype: DtypeOpt = "auto",
    pipeline: Annotated[Optional[str], typer.Option(help="pass pipeline: default or dfq")] = None,
    backend: BackendOpt = None,
    scheme: SchemeOpt = None,
    weight_scale: WeightScaleOpt = None,
    rounding_noise: RoundingNoiseOpt = None,
    recompute: RecomputeOpt = None,
    recompute_budget: RecomputeBudgetOpt = None,
) -> None:
    """Compile a model and write transformed.py, graph.json and report.md."""
    options = dict(locals())
    from .api import compile as frac_compile
    from .loading import example_input, load_model, parse_shape
    from .report import coverage_table, sites_table, write_transform_outputs

    shape = parse_shape(input_shape)
    cfg = _load_config(config, leaf, capture)
    if pipeline:
        cfg = cfg.replace(pipeline=pipeline)
    cfg = _override(cfg, options)
    _writable(out, "--out")
    model = load_model(model_spec)
    fmodel = frac_compile(copy.deepcopy(model), example_input(model, shape, dtype), cfg)
    console.print(
        sites_table(
            fmodel,
            title=f"{model_spec}: {type(model).__name__} (captured with torch.{fmodel.meta[GM_CAPTURE]})",
        )
    )
    if fmodel.fp32_ops:  # nothing GEMM-like is left in fp32 silently
        console.print(coverage_table(fmodel))
    console.print(fmodel.cost().summary())
    for path in write_transform_outputs(fmodel, out, model_spec):
        console.print(f"wrote {path}")


def _override(cfg, options: dict, **fields):
    """``cfg`` with the command-line options that were given: those of :data:`CONFIG_OPTIONS` in
    ``options`` (a command's parameters), and ``fields``."""
    fields = {**{k: options[k] for k in CONFIG_OPTIONS}, **fields}
    given = {k: v for k, v in fields.items() if v is not None}
    return cfg.replace(**given) if given else cfg


def _int_list(option: str, text: str) -> tuple[int, ...]:
    from .errors import ConfigError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"{option} {text!r} must be comma-separated bit widths, e.g. 3,4,6,8")
    return values


SCHEDULES = ("static", "pfq", "cyclic", "dfq", "fractrain")


def _make_schedule(
    kind: str,
    fw: str,
    bw: str,
    iters: int,
    pfq_every: int,
    eps: float,
    alpha: float,
    cycles: int,
    cp: float = 3.0,
    cp_step: float = 0.5,
    beta: float = 2.0,
    weight_bits: int = 8,
    cp_scope: str = "model",
):
    from .control import DFQ, PFQ, Cyclic, FracTrain, Static
    from .errors import ConfigError

    gated = {"beta": beta, "w": weight_bits, "cp_scope": cp_scope}
    if kind == "dfq":
        return DFQ(cp / 100, **gated)
    if kind == "fractrain":
        return FracTrain(cp / 100, cp_step / 100, eval_every=pfq_every, eps=eps, alpha=alpha, **gated)
    fws, bws = _int_list("--fw", fw), _int_list("--bw", bw)
    if kind == "static":
        return Static(fws[0], fws[0], bws[0])
    if kind == "pfq":
        return PFQ(fws, bws, eval_every=pfq_every, eps=eps, alpha=alpha)
    if kind == "cyclic":
        return Cyclic(min(fws), max(fws), cycles=cycles, total_iters=iters, g=bws[0])
    raise ConfigError(f"--schedule {kind!r} is not known: choose {', '.join(SCHEDULES)}")


def _make_data(spec: str, batch_size: int, block_size: int, train_limit, test_limit, seed: int):
    from .data import CharDataset, ClassificationData
    from .errors import ConfigError

    kind, _, where = spec.partition(":")
    try:
        if kind == "cifar10":
            return ClassificationData.from_source(
                where or "bundled",
                batch_size=batch_size,
                train_limit=train_limit,
                test_limit=test_limit,
                seed=seed,
            )
        if kind == "shakespeare":
            if not where:
                raise ConfigError("--data shakespeare:PATH needs the path of the text file")
            data = CharDataset.from_file(where, block_size=block_size, batch_size=batch_size, seed=seed)
            data.max_test_windows = test_limit or 256  # evaluation windows per period
            return data
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--data {spec}: {err}") from None
    raise ConfigError(
        f"--data {spec!r}: use cifar10:PATH (npz, pickle folder, image folder or "
        "'bundled') or shakespeare:PATH"
    )


@app.command()
@_one_line_errors
def train(
    model_spec: ModelArg,
    data: Annotated[str, typer.Option(help="cifar10:PATH|bundled or shakespeare:PATH")] = "cifar10:bundled",
    schedule: Annotated[str, typer.Option(help="static, pfq, cyclic, dfq or fractrain")] = "pfq",
    fw: Annotated[
        str, typer.Option(help="activation/weight bits (PFQ: one per stage; cyclic: low,high)")
    ] = "3,4,6,8",
    bw: Annotated[str, typer.Option(help="gradient bits (PFQ: one per stage)")] = "6,6,8,8",
    iters: Annotated[int, typer.Option(min=1)] = 1000,
    out: Annotated[Path, typer.Option(help="run directory (log.jsonl, checkpoint.pt, plots)")] = Path(
        "runs/train"
    ),
    resume: Annotated[Optional[Path], typer.Option(help="checkpoint to continue from")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option()] = 0.1,
    lr_schedule: Annotated[str, typer.Option(help="cosine, piecewise or constant")] = "cosine",
    optimizer: Annotated[str, typer.Option(help="sgd or adamw")] = "sgd",
    eval_every: Annotated[int, typer.Option(min=1, help="log/eval/checkpoint period")] = 100,
    pfq_every: Annotated[int, typer.Option(min=1, help="PFQ indicator period (iterations)")] = 100,
    eps: Annotated[float, typer.Option(help="PFQ threshold")] = 0.05,
    alpha: Annotated[float, typer.Option(help="PFQ threshold decay")] = 0.3,
    cycles: Annotated[int, typer.Option(min=1, help="cyclic: number of cycles")] = 8,
    cp: Annotated[float, typer.Option(help="dfq/fractrain: target cost, % of fp32")] = 3.0,
    cp_step: Annotated[float, typer.Option(help="fractrain: target raise per turning point, %")] = 0.5,
    beta: Annotated[float, typer.Option(help="dfq/fractrain: cost regularizer weight")] = 2.0,
    weight_bits: Annotated[int, typer.Option(help="dfq/fractrain: the weights' bits")] = 8,
    cp_scope: Annotated[
        str,
        typer.Option(
            help="dfq/fractrain: --cp is a % of fp32 training of the whole model (model) or of the "
            "gated layers alone (gated, as FracTrain's code counts it)"
        ),
    ] = "model",
    gate_mode: Annotated[str, typer.Option(help="dfq/fractrain: routed or dense")] = "routed",
    block_size: Annotated[int, typer.Option(min=2, help="shakespeare: context length")] = 64,
    train_limit: Annotated[Optional[int], typer.Option(help="random training subset size")] = None,
    test_limit: Annotated[
        Optional[int],
        typer.Option(help="random test subset size (shakespeare: validation windows, default 256)"),
    ] = None,
    config: ConfigOpt = None,
    backend: BackendOpt = None,
    scheme: SchemeOpt = None,
    weight_scale: WeightScaleOpt = None,
    rounding_noise: RoundingNoiseOpt = None,
    recompute: RecomputeOpt = None,
    recompute_budget: RecomputeBudgetOpt = None,
    kernels: Annotated[Optional[Path], typer.Option(help="tvm: kernels written by `export`")] = None,
    tuning_db: Annotated[Optional[Path], typer.Option(help="tvm: a `tune` database")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    deterministic: Annotated[bool, typer.Option(help="torch deterministic algorithms")] = False,
    on_nonfinite: Annotated[
        str,
        typer.Option(
            help="a step with a NaN/inf loss or gradient: skip it (and stop after --max-nonfinite in "
            "a row) or stop at once; it never reaches the weights or the checkpoint"
        ),
    ] = "skip",
    max_nonfinite: Annotated[
        int, typer.Option(min=1, help="non-finite steps in a row that stop the run")
    ] = 10,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            min=1,
            help="train with this many processes on this machine (DistributedDataParallel, "
            "the cores split between them; --batch-size is per process); several "
            "machines: see docs/distributed.md",
        ),
    ] = 1,
    distributed: Annotated[
        str, typer.Option(help="with several processes: ddp or fsdp (FSDP2's fully_shard); auto = ddp")
    ] = "auto",
) -> None:
    """Train a model with a precision schedule; logs, checkpoints and plots go to --out."""
    params = dict(locals())
    from .distributed import launch, launched
    from .errors import ConfigError

    nproc = params.pop("nproc_per_node")
    if nproc > 1 and launched():
        raise ConfigError(
            "--nproc-per-node: this process is already one of several (started by "
            "torchrun): leave the option out"
        )
    if nproc > 1:
        _writable(out, "--out")  # refused once, before any process starts
        console.print(f"starting {nproc} processes")
        try:
            launch(nproc, _train_worker, params)
        except FracCompileError as err:
            raise type(err)(f"{err}; {_last_checkpoint(out / 'checkpoint.pt')}") from None
        return
    _train(**params)


def _last_checkpoint(path: Path) -> str:
    """What a run that failed left to resume from, in words."""
    from .checkpoint import load_checkpoint

    try:
        state = load_checkpoint(path)
    except (FileNotFoundError, FracCompileError):
        return "no checkpoint was written"
    return (
        f"the last checkpoint, {path} (iteration {state['iteration']}), is intact: continue "
        f"with --resume {path}"
    )


def _train_worker(params: dict) -> None:
    """One process of ``train --nproc-per-node N`` (started by :func:`fraccompile.distributed.launch`)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_train)(**params)


# `train`'s options that are FitConfig fields of the same name, and those run.json records
FIT_OPTIONS = (
    "iters",
    "eval_every",
    "lr",
    "optimizer",
    "lr_schedule",
    "resume",
    "seed",
    "deterministic",
    "max_nonfinite",
    "distributed",
)
RUN_INFO = (
    "data",
    "schedule",
    "fw",
    "bw",
    "batch_size",
    "pfq_every",
    "eps",
    "alpha",
    "cycles",
    "cp",
    "cp_step",
    "beta",
    "weight_bits",
    "cp_scope",
)


def _train(
    model_spec,
    data,
    schedule,
    fw,
    bw,
    iters,
    out,
    resume,
    batch_size,
    lr,
    lr_schedule,
    optimizer,
    eval_every,
    pfq_every,
    eps,
    alpha,
    cycles,
    cp,
    cp_step,
    beta,
    weight_bits,
    cp_scope,
    gate_mode,
    block_size,
    train_limit,
    test_limit,
    config,
    backend,
    scheme,
    weight_scale,
    rounding_noise,
    recompute,
    recompute_budget,
    kernels,
    tuning_db,
    seed,
    deterministic,
    on_nonfinite,
    max_nonfinite,
    distributed,
) -> None:
    """``train`` in this process (one of several under torchrun)."""
    options = dict(locals())
    import os

    import torch

    from .api import compile as frac_compile
    from .errors import ConfigError
    from .fitconfig import FitConfig
    from .loading import load_model
    from .train import check_model_state, fit, load_checkpoint

    is_main = int(os.environ.get("RANK", "0")) == 0
    out_console = console if is_main else Console(quiet=True)
    fit_config = FitConfig(  # checks the options before any long work
        **{k: options[k] for k in FIT_OPTIONS},
        out_dir=out,
        nonfinite=on_nonfinite,
        model_name=model_spec,
        run_info={"model": model_spec, **{k: options[k] for k in RUN_INFO}},
    )
    _writable(out, "--out")
    saved = None
    if resume is not None and is_main:  # a damaged or foreign checkpoint: refused before compiling
        try:
            saved = load_checkpoint(resume)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    sched = _make_schedule(
        schedule, fw, bw, iters, pfq_every, eps, alpha, cycles, cp, cp_step, beta, weight_bits, cp_scope
    )
    cfg = _override(
        _load_config(config, [], None),
        options,
        kernels=str(kernels) if kernels else None,
        tuning_db=str(tuning_db) if tuning_db else None,
    )
    if schedule in ("dfq", "fractrain"):
        cfg = cfg.replace(pipeline="dfq", gate_mode=gate_mode)
    dataset = _make_data(data, batch_size, block_size, train_limit, test_limit, seed)
    torch.manual_seed(seed)
    model = load_model(model_spec)
    if saved is not None:  # its model's keys and shapes (compiling only adds keys)
        check_model_state(resume, saved["model"], model.state_dict(), exact=False)
        del saved
    x, _ = next(iter(dataset.batches(0)))
    vocab = getattr(dataset, "vocab_size", None)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if vocab is not None and embeddings and embeddings[0].num_embeddings < vocab:
        raise ConfigError(
            f"the model's embedding has {embeddings[0].num_embeddings} tokens but "
            f"{data} has a vocabulary of {vocab}"
        )
    fmodel = frac_compile(model, x, cfg)
    out_console.print(f"training {model_spec} on {data}: {sched.describe()}, {iters} iterations")
    try:
        result = fit(fmodel, dataset, fit_config, schedule=sched, console=out_console)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if not is_main:
        return
    meter = fmodel.frac_meter
    turning = [e["iter"] for e in result.events if e.get("event") == "turning_point"]
    console.print(
        f"done: {result.iterations} iterations; precision switches at {turning or 'none'}; "
        f"bit-cost {meter.total / meter.fp32:.2%} of fp32 training, "
        f"{1 - meter.total / meter.sbm:.1%} saved against static 8/8/8 (SBM)"
    )
    from .plots import render_report

    for path in render_report(out):
        console.print(f"wrote {path}")


@app.command()
@_one_line_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with log.jsonl")],
    out: Annotated[Optional[Path], typer.Option(help="where to write (default: RUN_DIR)")] = None,
) -> None:
    """Render loss/accuracy curves, the precision timeline and the cost plot of a training run."""
    from .errors import ConfigError
    from .plots import render_report

    if out is not None:
        _writable(out, "--out")
    try:
        paths = render_report(run_dir, out)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    for path in paths:
        console.print(f"wrote {path}")


@app.command()
@_one_line_errors
def demo(
    iters: Annotated[int, typer.Option(min=1, help="training iterations")] = 90,
    batch_size: Annotated[int, typer.Option(min=1, help="batch size")] = 64,
    scheme: Annotated[str, typer.Option(help="sbm or symmetric")] = "sbm",
    out: Annotated[Optional[Path], typer.Option(help="also write log.jsonl and checkpoint here")] = None,
) -> None:
    """Compile the bundled ResNet-20 and train it with PFQ on the bundled CIFAR-10 subset, on the
    integer kernels where TVM runs (backend auto), and time its step against fp32's."""
    from .config import FracConfig
    from .demo import run_demo

    if out is not None:
        _writable(out, "--out")
    run_demo(iters, batch_size, FracConfig(scheme=scheme, backend="auto"), out_dir=out, console=console)


def main() -> None:
    app()


# `tune` and `export` register themselves on `app` (kernel tooling, in its own module)
from . import cli_kernels  # noqa: E402, F401

if __name__ == "__main__":  # python -m fraccompile.cli: the app of the imported module, which has them all
    from fraccompile.cli import main as _main

    _main()
