"""Untuned vs tuned GOPS of every distinct integer GEMM of a model (the tile search of
``fraccompile tune``), and optionally MetaSchedule on one problem for comparison.

    python bench/tune.py --models resnet20 --trials 16
    python bench/tune.py --metaschedule 256 --ms-trials 16

The model's GEMM problems come from one recorded training step at batch 128 (every site at 8 bits,
symmetric scheme). Each problem is tuned into a fresh database (or ``--db``), then the default and
the tuned kernels are measured again, alternately, ``--repeats`` times: the table's GOPS are the
medians of that re-measurement, not the search's own figures. GOPS count the unpadded problem.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, print_table  # noqa: E402

import fraccompile  # noqa: E402
from fraccompile.examples import resnet_cifar, transformer_lm  # noqa: E402
from fraccompile.kernel_tools import open_tuning_db, tuned_gemm_cells  # noqa: E402
from fraccompile.targets.kernels import gemm  # noqa: E402
from fraccompile.targets.runtime.tuning_db import TuningDB  # noqa: E402
from fraccompile.targets.tools.export import record  # noqa: E402
from fraccompile.targets.tools.tuning import LocalRunner, tune  # noqa: E402

MODELS = {
    "resnet20": ("ResNet-20", resnet_cifar.resnet20, lambda: torch.randn(128, 3, 32, 32)),
    "transformer": ("Transformer d512", transformer_lm.model_d512, lambda: torch.randint(0, 65, (128, 64))),
}


def model_problems(key: str):
    _, make, make_x = MODELS[key]
    torch.manual_seed(0)
    x = make_x()
    cfg = fraccompile.FracConfig(scheme="symmetric", backend="tvm")
    fm = fraccompile.compile(make(), x, cfg)
    return record(fm, x)


def gops(problem, seconds: float) -> float:
    G, M, N, K = problem
    return 2 * G * M * N * K / seconds / 1e9


def remeasure(problem, tiles, runner, repeats: int) -> list[float]:
    """Median seconds per tile, measuring the tiles in turn ``repeats`` times."""
    times = {t: [] for t in tiles}
    for _ in range(repeats):
        for t in tiles:
            times[t].append(runner.time(gemm.padded(*problem, gemm.Tile(*t)), confirm=True))
    return [statistics.median(times[t]) for t in tiles]


def bench_models(args) -> None:
    runner = LocalRunner()
    tmp = tempfile.TemporaryDirectory(prefix="fraccompile-tune-") if args.db is None else None
    db = open_tuning_db(args.db or tmp.name)
    rows, speedups, total_s = [], [], 0.0
    for key in args.models.split(","):
        rec = model_problems(key)
        problems = sorted(rec.problems)
        t0 = time.perf_counter()
        results = tune(problems, db, runner, args.trials, args.time_budget, args.seed)
        spent = time.perf_counter() - t0
        total_s += spent
        for res in results:
            r = res.record
            d, t = (
                remeasure(r.problem, [r.default_tile, r.tile], runner, args.repeats)
                if r.tile != r.default_tile
                else [None, None]
            )
            if d is None:
                d = t = remeasure(r.problem, [r.default_tile], runner, args.repeats)[0]
            sites = sorted({f"{s}:{role}" for s, role in rec.problems[r.problem] if s})
            speedups.append(d / t)
            rows.append(
                [
                    MODELS[key][0],
                    *tuned_gemm_cells(r, sites),
                    f"{gops(r.problem, d):.0f}",
                    f"{gops(r.problem, t):.0f}",
                    f"{d / t:.2f}x",
                    str(r.trials),
                    f"{r.seconds:.1f}",
                ]
            )
        print(f"{MODELS[key][0]}: {len(problems)} problems tuned in {spent:.0f} s")
    print()
    print_table(
        [
            "model",
            "G,M,N,K",
            "sites",
            "default tile",
            "tuned tile",
            "GOPS default",
            "GOPS tuned",
            "speed-up",
            "trials",
            "tune s",
        ],
        rows,
    )
    geo = statistics.geometric_mean(speedups)
    print(
        f"\n{len(rows)} kernels, {args.trials} trials each, {total_s:.0f} s of tuning; "
        f"speed-up geometric mean {geo:.2f}x, min {min(speedups):.2f}x, max {max(speedups):.2f}x "
        f"(re-measured medians of {args.repeats} alternating runs)"
    )
    if tmp:
        tmp.cleanup()


def bench_metaschedule(args) -> None:
    """MetaSchedule's ``tune_tir`` on the plain GEMM definition, against the template."""
    from fraccompile.errors import require_extra

    require_extra("tune", "--metaschedule (MetaSchedule's XGBoost cost model)", ("xgboost",))
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from fraccompile.targets.runtime.host import detect
    from fraccompile.targets.tools.tuning import _operands

    host = detect()
    n = args.metaschedule
    problem = (1, n, n, n)
    shape = gemm.padded(*problem)
    mod = tvm.IRModule({"main": gemm.definition(shape)})
    target = host.target()
    dev = tvm.cpu()
    arrays = [tvm.runtime.tensor(x, dev) for x in _operands(shape)]

    def measure(lib):
        f = lib.mod.time_evaluator("main", dev, number=1, repeat=args.repeats, min_repeat_ms=40)
        return statistics.median(f(*arrays).results)

    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd:
        db = ms.tune_tir(
            mod,
            target,
            wd,
            max_trials_global=args.ms_trials,
            num_trials_per_iter=min(args.ms_trials, 8),
            builder=ms.builder.LocalBuilder(timeout_sec=args.ms_timeout),
            runner=ms.runner.LocalRunner(timeout_sec=60),
        )
        ms_s = time.perf_counter() - t0
        sch = ms.tir_integration.compile_tir(db, mod, target)
        ms_t = measure(tvm.compile(sch.mod, target=target)) if sch is not None else None
        failed = sum(
            log.read_text(errors="replace").count("Error in building")
            for log in pathlib.Path(wd, "logs").glob("*.log")
        )
    rows.append(
        [
            "MetaSchedule tune_tir",
            str(args.ms_trials),
            f"{ms_s:.0f}",
            f"{gops(problem, ms_t):.0f}" if ms_t else "no valid schedule",
        ]
    )
    if failed:
        print(f"MetaSchedule: {failed} of {args.ms_trials} candidates failed to build")
    t0 = time.perf_counter()
    rec = tune([problem], TuningDB(tempfile.mkdtemp()), LocalRunner(), args.trials)[0].record
    tpl_s = time.perf_counter() - t0
    tpl_t = measure(gemm.build(gemm.padded(*problem, gemm.Tile(*rec.tile)), host))
    rows.append(
        ["template search (fraccompile tune)", str(rec.trials), f"{tpl_s:.0f}", f"{gops(problem, tpl_t):.0f}"]
    )
    print(f"{n}x{n}x{n} u8 x s8 -> s32 GEMM")
    print_table(["search", "trials", "seconds", "GOPS"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=None)
    parser.add_argument("--db", default=None, help="tuning database (default: a fresh one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--metaschedule",
        type=int,
        default=None,
        metavar="N",
        help="compare with MetaSchedule on an N^3 GEMM instead",
    )
    parser.add_argument("--ms-trials", type=int, default=16)
    parser.add_argument("--ms-timeout", type=int, default=120, help="MetaSchedule builder timeout")
    args = parser.parse_args()
    for k in args.models.split(","):
        if k not in MODELS:
            parser.error(f"unknown model {k!r}; choose from {', '.join(MODELS)}")
    header("Tuning the integer GEMM template: untuned vs tuned kernels")
    if args.metaschedule:
        bench_metaschedule(args)
    else:
        bench_models(args)


if __name__ == "__main__":
    main()
