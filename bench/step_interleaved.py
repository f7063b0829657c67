"""Training-step time of fp32 and compiled variants in one process, their steps interleaved.

``bench/step.py`` runs each configuration in a fresh process, so each pays its own allocator
state (fresh multi-MB tensors page-faulted in, or not) and the machine's drift between runs
(±10% and more on these 2 cores). This script builds the fp32 model and every variant in one
process from the same weights and runs their steps round-robin: step i of every variant runs
within a second of the others, on the same allocator, so the per-round ratio to fp32 cancels the
drift, and no variant gains from page faults the others pay. It reports each variant's median
step and the median and quartiles of its per-round ratio to fp32.

    python bench/step_interleaved.py [--model resnet20|transformer] [--rounds 24]
        [--channels-last] [--weight-scale channel|tensor] [VARIANT ...]

A VARIANT is ``RECOMPUTE[:BUDGET]`` of the compiled model (a=w=g=8, symmetric, tvm backend):
``activations`` (the default), ``none``, ``norms``, ``norms:0.4`` (``recompute_budget`` 0.4) or
``activations:1``;
default: ``activations norms norms:0.4``. ``--channels-last`` (ResNet-20): the model and its input
in ``torch.channels_last`` memory format, for fp32 and the variants alike (oneDNN's fp32 convs on
these cores are much faster channels-last than NCHW). ``--weight-scale`` sets
``FracConfig.weight_scale`` of every variant (``tensor``: the error backprop of linear layers and
stride-1 convs runs in integers).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import fraccompile.targets.backend  # noqa: F401  isort: skip  (sets TVM's thread count first)

import torch
from _common import header, print_table
from step import MODELS, make_case

import fraccompile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="resnet20")
    parser.add_argument("--rounds", type=int, default=24, help="steps per variant (2 warm-up)")
    parser.add_argument(
        "--channels-last", action="store_true", help="model and input in torch.channels_last (ResNet-20)"
    )
    parser.add_argument("--weight-scale", choices=("channel", "tensor"), default="channel")
    parser.add_argument("variants", nargs="*", default=["activations", "norms", "norms:0.4"])
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the first two are warm-up)")
    header("Training step, fp32 and compiled variants interleaved in one process")
    base, x, y, loss_fn = make_case(args.model)
    if args.channels_last:
        if x.dim() != 4:
            parser.error("--channels-last is for the 4-D input of resnet20")
        base, x = base.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    models = {"fp32": copy.deepcopy(base)}
    for spec in args.variants:
        recompute, _, budget = spec.partition(":")
        cfg = fraccompile.FracConfig(
            a=8,
            w=8,
            g=8,
            scheme="symmetric",
            backend="tvm",
            recompute=recompute,
            recompute_budget=float(budget or 0),
            weight_scale=args.weight_scale,
        )
        models[spec] = fraccompile.compile(copy.deepcopy(base), x, config=cfg)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}

    def step(key: str) -> float:
        t0 = time.perf_counter()
        opts[key].zero_grad(set_to_none=True)
        loss_fn(models[key](x), y).backward()
        opts[key].step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for key in models:
            t = step(key)
            if r >= 2:
                times[key].append(t)
    layout = ", channels-last" if args.channels_last else ""
    print(
        f"{MODELS[args.model]}{layout}; a=w=g=8 symmetric, weight_scale "
        f"{args.weight_scale}, tvm backend; {args.rounds - 2} "
        "rounds (after 2 warm-up), each running one step of every variant in turn"
    )
    rows = []
    for key, ts in times.items():
        ratios = [t / f for t, f in zip(ts, times["fp32"])]
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        rows.append(
            [
                key if key == "fp32" else f"recompute {key}",
                f"{statistics.median(ts) * 1e3:.1f}",
                f"{med:.2f}x",
                f"{q1:.2f}-{q3:.2f}x",
            ]
        )
    print_table(["variant", "median step ms", "per-round ratio to fp32: median", "quartiles"], rows)


if __name__ == "__main__":
    main()
