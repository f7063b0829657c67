"""Attention memory: fused ``F.scaled_dot_product_attention`` against fraccompile's decomposed SDPA
site (QKᵀ and AV as quantized matmul sites, the score matrix materialized).

For each (batch, heads, length, head dim) it measures, over ``--repeats`` runs (median):

* ``saved``: bytes autograd keeps for backward after the forward (distinct storages, inputs
  excluded), through ``torch.autograd.graph.saved_tensors_hooks``;
* ``peak``: the forward + backward's peak of CPU memory allocated by torch above the start
  (``torch.profiler`` with ``profile_memory=True``, allocations and frees summed in time order).

    python bench/attention_memory.py [--shapes 4,8,256,64 4,8,1024,64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fraccompile
from fraccompile import FracConfig


class Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _saved_bytes(fn, inputs) -> int:
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    out.sum().backward()
    return sum(seen.values())


def _peak_bytes(fn, inputs) -> int:
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn(*inputs).sum().backward()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        if e.cpu_memory_usage and not e.cpu_children:  # leaf events: no double counting
            level += e.cpu_memory_usage
            peak = max(peak, level)
    return peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4,8,256,64", "2,8,1024,64"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"command: python bench/attention_memory.py {' '.join(argv or sys.argv[1:])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}"
    )
    print(f"{'B,H,L,D':>14} {'variant':>22} {'saved MiB':>10} {'peak MiB':>10}")
    for shape in args.shapes:
        B, H, L, D = map(int, shape.split(","))
        q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
        fused = Attn()
        variants = {"fused (fp32)": fused}
        for name, prec in (("site, precision 0", 0), ("site, 8/8/8", 8)):
            fm = fraccompile.compile(Attn(), (q, k, v), FracConfig(a=prec, w=prec, g=prec, full_precision=()))
            variants[name] = fm
        for name, fn in variants.items():
            saved = statistics.median(_saved_bytes(fn, (q, k, v)) for _ in range(args.repeats))
            peak = statistics.median(_peak_bytes(fn, (q, k, v)) for _ in range(args.repeats))
            print(f"{shape:>14} {name:>22} {saved / 2**20:10.1f} {peak / 2**20:10.1f}")


if __name__ == "__main__":
    main()
