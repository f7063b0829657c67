"""The torch ops a training step keeps: a model compiled on the ``tvm`` backend next to its fp32
baseline, time per kind of op, from torch's profiler, in one process.

What it answers: how much of the baseline's step the tvm step still spends in the same fp32 torch
ops (BatchNorm, ReLU, the residual adds, and with per-channel weight ranges the fp32 error
backprop), which bounds the speed-up the integer kernels can give whatever they cost; and how
much goes to the rest (the TVM kernels and the Python that drives them, which torch's profiler
sees as the sites' autograd Functions, ``IntSiteGemm`` / ``IntSiteGemmBackward``).

    python bench/step_ops.py [--model resnet20|resnet38|transformer] [--batch B] [--rounds 3]
        [--weight-scale channel|tensor|gemm] [--scheme sbm|symmetric] [--recompute ...]

The baseline is the one a user would pick: fp32 channels-last for the ResNets, fp32 for the
Transformer. Each round profiles one step of each (after two warm-up steps of each), alternating;
the table holds the per-kind median over rounds of self CPU ms per step. The profiler's own cost
inflates every row somewhat; the ``wall`` row is a step without the profiler (the median of the
same rounds). The last line is the fraction of the baseline's (profiled) step that the tvm step spends in
fp32 ops the baseline runs too: the tvm step's floor under this configuration.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import fraccompile.targets.backend  # noqa: F401  isort: skip  (sets TVM's thread count first)

import torch
from _common import header, print_table
from fractrain_step import build, make_case  # the same models, inputs, losses and baselines
from torch.profiler import profile

import fraccompile

# aten op -> kind; ops not listed are "other torch ops"
KINDS = {
    "aten::mkldnn_convolution": "conv forward (fp32)",
    "aten::convolution_backward": "conv backward (fp32)",
    "aten::mm": "matmul (fp32)",
    "aten::bmm": "matmul (fp32)",
    "aten::addmm": "matmul (fp32)",
    "aten::native_batch_norm": "batch norm",
    "aten::native_batch_norm_backward": "batch norm",
    "aten::native_layer_norm": "layer norm",
    "aten::native_layer_norm_backward": "layer norm",
    "aten::relu": "relu",
    "aten::clamp_min": "relu",
    "aten::threshold_backward": "relu",
    "aten::gelu": "gelu",
    "aten::gelu_backward": "gelu",
    "aten::add": "adds",
    "aten::add_": "adds",
    "aten::copy_": "copies",
    "aten::_to_copy": "copies",
    "aten::clone": "copies",
    "aten::aminmax": "ranges (aminmax)",
    "aten::_softmax": "softmax",
    "aten::_softmax_backward_data": "softmax",
}
# what the baseline runs too: the fp32 ops the integer kernels do not replace
SHARED = (
    "conv backward (fp32)",
    "matmul (fp32)",
    "batch norm",
    "layer norm",
    "relu",
    "gelu",
    "adds",
    "softmax",
)
SITES = "fraccompile sites (TVM kernels, Python)"


def kind_of(name: str) -> str:
    if name in KINDS:
        return KINDS[name]
    if name.startswith("aten::"):
        return "other torch ops"
    if name.startswith("IntSiteGemm") or name.startswith("GateProbe"):
        return SITES
    if name.startswith("MaskedReLU"):  # a ReLU that keeps a byte mask (its backward: a TVM kernel)
        return "relu"
    return "autograd, Python and the rest"


def profiled_step(step) -> dict[str, float]:
    """Self CPU ms per kind for one call of ``step``."""
    with profile() as prof:
        step()
    out: dict[str, float] = collections.defaultdict(float)
    for e in prof.key_averages():
        out[kind_of(e.key)] += e.self_cpu_time_total / 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "resnet38", "transformer"), default="resnet20")
    parser.add_argument("--batch", type=int, default=None, help="128 for the ResNets, 32 for the Transformer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scheme", choices=("sbm", "symmetric"), default="sbm")
    parser.add_argument("--weight-scale", choices=("channel", "tensor", "gemm"), default="channel")
    parser.add_argument("--recompute", choices=("none", "activations", "norms"), default="activations")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    batch = args.batch or (32 if args.model == "transformer" else 128)
    header(f"The torch ops of a {args.model} step (batch {batch}): tvm against its fp32 baseline")
    options = {k: getattr(args, k) for k in ("scheme", "weight_scale", "recompute")}
    cfg = fraccompile.FracConfig(a=8, w=8, g=8, backend="tvm", rounding_noise="counter", **options)
    print(f"{cfg!r}\n")
    model, x, y, loss_fn = make_case(args.model, batch)
    baseline = "fp32-cl" if args.model.startswith("resnet") else "fp32"
    base, xb, _ = build(args.model, baseline, model, x, {})  # a copy, channels-last for convnets
    fm = fraccompile.compile(model, x, config=cfg)
    cases = {baseline: (base, xb), "tvm": (fm, x)}
    steps = {}
    for name, (m, inp) in cases.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m=m, inp=inp, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(m(inp), y).backward()
            opt.step()

        steps[name] = step
        for _ in range(2):
            step()
    walls: dict[str, list[float]] = collections.defaultdict(list)
    kinds: dict[str, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            walls[name].append(1000 * (time.perf_counter() - t0))
            for kind, ms in profiled_step(step).items():
                kinds[name][kind].append(ms)
    names = list(steps)
    med = {
        n: {k: statistics.median(v + [0.0] * (args.rounds - len(v))) for k, v in kinds[n].items()}
        for n in names
    }
    wall = {n: statistics.median(walls[n]) for n in names}
    order = sorted({k for n in names for k in med[n]}, key=lambda k: -max(med[n].get(k, 0.0) for n in names))
    rows = [[k, *(f"{med[n].get(k, 0.0):.1f}" for n in names)] for k in order]
    rows.append(["all profiled (self CPU)", *(f"{sum(med[n].values()):.1f}" for n in names)])
    rows.append(["wall, no profiler", *(f"{wall[n]:.1f}" for n in names)])
    print(f"ms per step, median of {args.rounds} rounds (each: one step of each, alternating)")
    print_table(["kind of op", *names], rows)
    kept = sum(med["tvm"].get(k, 0.0) for k in SHARED)
    print()
    print(f"tvm step / baseline step (wall): {wall['tvm'] / wall[names[0]]:.2f}x")
    print(
        f"kept fp32 ops ({', '.join(k for k in SHARED if med['tvm'].get(k))}) in the tvm step: "
        f"{kept:.1f} ms, {kept / sum(med[names[0]].values()):.2f}x the baseline's profiled step"
    )


if __name__ == "__main__":
    main()
