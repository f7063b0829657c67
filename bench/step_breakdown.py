"""Where a TVM-backend training step goes: wall time per backend function, ResNet-20.

Wraps the functions of :mod:`fraccompile.targets.backend` with timers (nested: ``gemm`` includes
its packing, ``fw``/``gc``/``eb`` include their GEMMs) and runs forward + backward steps of
ResNet-20 (batch 128, a=w=g=8, symmetric) after two warm-up steps.

    python bench/step_breakdown.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

from fraccompile.targets import backend as B  # isort: skip  (sets TVM's thread count first)

import torch
import torch.nn.functional as F
from _common import header, print_table

import fraccompile
from fraccompile.examples.resnet_cifar import resnet20

FUNCTIONS = ("_to_codes", "_im2col", "_pack_a", "_pack_b")
METHODS = ("run_site", "fw", "eb", "gc", "_gemm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header("TVM backend: where a ResNet-20 training step goes")
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

    for name in FUNCTIONS:
        setattr(B, name, timed(getattr(B, name), name))
    for name in METHODS:
        setattr(B.TVMBackend, name, timed(getattr(B.TVMBackend, name), name))

    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    cfg = fraccompile.FracConfig(a=8, w=8, g=8, scheme="symmetric", backend="tvm")
    fm = fraccompile.compile(resnet20(), x, config=cfg)
    for _ in range(2):
        F.cross_entropy(fm(x), y).backward()
    total.clear()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        out = fm(x)
        total["forward (all of it)"] += time.perf_counter() - t1
        F.cross_entropy(out, y).backward()
    total["step (all of it)"] = time.perf_counter() - t0
    rows = [[name, f"{seconds / args.repeats * 1000:.1f}"]
            for name, seconds in sorted(total.items(), key=lambda kv: -kv[1])]
    print(f"ms per step, mean of {args.repeats} steps (nested: _gemm includes its packing and the "
          "kernel call; fw/gc/eb include their _gemm)")
    print_table(["function", "ms / step"], rows)


if __name__ == "__main__":
    main()
