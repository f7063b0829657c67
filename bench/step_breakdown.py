"""Where a TVM-backend training step goes: wall time per backend function and per kind of TVM
kernel, ResNet-20 or the Transformer example.

Wraps the functions of the ``tvm`` backend (:mod:`fraccompile.targets.backend.tvm_backend` and the
modules it is built from, :mod:`~fraccompile.targets.backend.roles` and
:mod:`~fraccompile.targets.backend.gemm_runtime`)
with timers (nested: ``gemm`` includes its packing, ``fw``/``gc``/``eb`` include their GEMMs),
and every TVM kernel call (``kernel: gemm``, ``kernel: quantize``, ``kernel: pack_a`` ...: the
compiled functions alone), and runs forward + backward steps (a=w=g=8; ``--scheme sbm``, FracTrain's
quantizer, by default) after two
warm-up steps: ResNet-20 at batch 128, or the Transformer (d_model 512) at batch 32 x 64 tokens.

    python bench/step_breakdown.py [--repeats 3] [--model resnet20|transformer] [--scheme sbm|symmetric]
        [--weight-scale channel|tensor] [--rounding-noise counter|torch]
        [--recompute activations|none|norms] [--recompute-budget F]
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

from fraccompile.targets import backend as B  # isort: skip  (sets TVM's thread count first)
from fraccompile.targets.backend import gemm_runtime, roles, tvm_backend  # isort: skip
from fraccompile.targets.runtime import threads  # isort: skip

import torch
import torch.nn.functional as F
from _common import header, print_table

import fraccompile
from fraccompile.examples import transformer_lm
from fraccompile.examples.resnet_cifar import resnet20

# each function in the module whose code calls it (a module global: patched where it is looked up)
FUNCTIONS = (
    (tvm_backend, "_to_codes"),
    (roles, "_im2col"),
    (gemm_runtime, "_pack_a"),
    (gemm_runtime, "_pack_b"),
)
METHODS = ("run_site", "fw", "eb", "gc", "_gemm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("resnet20", "transformer"), default="resnet20")
    parser.add_argument("--scheme", choices=("sbm", "symmetric"), default="sbm")
    parser.add_argument("--weight-scale", choices=("channel", "tensor", "gemm"), default="channel")
    parser.add_argument("--rounding-noise", choices=("torch", "counter"), default="counter")
    parser.add_argument("--recompute", choices=("none", "activations", "norms"), default="activations")
    parser.add_argument("--recompute-budget", type=float, default=0.0)
    args = parser.parse_args()
    header(f"TVM backend: where a {args.model} training step goes")
    print(
        f"FracConfig(a=8, w=8, g=8, scheme={args.scheme!r}, weight_scale={args.weight_scale!r}, "
        f"rounding_noise={args.rounding_noise!r}, recompute={args.recompute!r}, "
        f"recompute_budget={args.recompute_budget:g})"
    )
    print(f"kernels' parallel loops on {threads.pool()}")
    total: dict[str, float] = collections.defaultdict(float)
    depth: dict[str, int] = collections.defaultdict(int)

    def timed(fn, name):
        @functools.wraps(fn)
        def wrapper(*a, **k):  # outermost call only (_gemm recurses to split long reductions)
            depth[name] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[name] -= 1
                if not depth[name]:
                    total[name] += time.perf_counter() - t0

        return wrapper

    for module, name in FUNCTIONS:
        setattr(module, name, timed(getattr(module, name), name))
    for name in METHODS:
        setattr(B.TVMBackend, name, timed(getattr(B.TVMBackend, name), name))
    kernel = B.TVMBackend.kernel

    def timed_kernel(self, ref):  # the compiled function alone, per kind of kernel
        fn = kernel(self, ref)

        def call(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                total[f"kernel: {ref.kind}"] += time.perf_counter() - t0

        return call

    B.TVMBackend.kernel = timed_kernel

    torch.manual_seed(0)
    if args.model == "resnet20":
        model, x, y = resnet20(), torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    else:
        model = transformer_lm.model_d512()
        tokens = torch.randint(0, 65, (32, 65))
        x, y = tokens[:, :-1], tokens[:, 1:]
    cfg = fraccompile.FracConfig(
        a=8,
        w=8,
        g=8,
        scheme=args.scheme,
        backend="tvm",
        weight_scale=args.weight_scale,
        rounding_noise=args.rounding_noise,
        recompute=args.recompute,
        recompute_budget=args.recompute_budget,
    )
    fm = fraccompile.compile(model, x, config=cfg)

    def loss_of(out):
        return F.cross_entropy(out.flatten(0, 1) if out.dim() == 3 else out, y.flatten())

    for _ in range(2):
        loss_of(fm(x)).backward()
    total.clear()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        out = fm(x)
        total["forward (all of it)"] += time.perf_counter() - t1
        loss_of(out).backward()
    total["step (all of it)"] = time.perf_counter() - t0
    rows = [
        [name, f"{seconds / args.repeats * 1000:.1f}"]
        for name, seconds in sorted(total.items(), key=lambda kv: -kv[1])
    ]
    print(
        f"ms per step, mean of {args.repeats} steps (nested: _gemm includes its packing and the "
        "kernel call; fw/gc/eb include their _gemm)"
    )
    print_table(["function", "ms / step"], rows)


if __name__ == "__main__":
    main()
