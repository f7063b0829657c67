"""Training-step time of the Transformer example (d_model 512) on an NVIDIA GPU: fp32 eager, bf16
autocast eager, and the fraccompile ``tvm`` backend at 8/8/8 (symmetric: int8 codes, the TVM
integer GEMM (tensor-core mma on compute capability 8.0+) for every integer role of every site;
the torch quantizer on the GPU).

    python bench/gpu_step.py [--repeats 10] [--batch 32] [--profile]

A row for the reference backend at 8/8/8 (fake quantization in fp32 on the GPU) separates the cost
of quantizing from that of the integer GEMMs. ``--profile`` adds a torch.profiler table of three
TVM-backend steps: the ops with the most self CPU time, with their GPU time and call counts.

One step = forward, cross-entropy, backward, SGD update; CUDA-event medians over ``--repeats`` steps
after 3 warm-up steps (kernel builds happen in the warm-up). Prints "no GPU: skipped" and exits 0
without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header, print_table  # noqa: E402

import fraccompile  # noqa: E402
from fraccompile.examples import transformer_lm  # noqa: E402
from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason  # noqa: E402


def step_ms(model, x, y, repeats: int, autocast: bool = False) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument(
        "--profile", action="store_true", help="also print a torch.profiler table of three TVM-backend steps"
    )
    args = parser.parse_args()
    reason = gpu_unavailable_reason()
    if reason:
        print(f"no GPU: skipped ({reason})")
        return
    header("Transformer d512 training step on the GPU: fp32, bf16 autocast, TVM (mma) backend")
    print(f"GPU: {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    base = transformer_lm.model_d512()
    tokens = torch.randint(0, 65, (args.batch, args.block + 1))
    x, y = tokens[:, :-1].cuda(), tokens[:, 1:].cuda()
    rows = []
    fp32 = step_ms(copy.deepcopy(base).cuda(), x, y, args.repeats)
    rows.append(["fp32 eager", f"{fp32:.2f}", "1.00x"])
    bf16 = step_ms(copy.deepcopy(base).cuda(), x, y, args.repeats, autocast=True)
    rows.append(["bf16 autocast eager", f"{bf16:.2f}", f"{fp32 / bf16:.2f}x"])
    for backend in ("reference", "tvm"):
        cfg = fraccompile.FracConfig(a=8, w=8, g=8, scheme="symmetric", backend=backend)
        # compiled on the CPU, then moved (the sites' range buffers move with the module)
        fm = fraccompile.compile(copy.deepcopy(base), tokens[:, :-1], cfg).cuda()
        ms = step_ms(fm, x, y, args.repeats)
        what = (
            f"{sum(s.backend == 'tvm' for s in fm.sites)} sites on the TVM GEMM"
            if backend == "tvm"
            else "fake-quant fp32"
        )
        rows.append([f"fraccompile {backend} 8/8/8 ({what})", f"{ms:.2f}", f"{fp32 / ms:.2f}x"])
    print(f"batch {args.batch} x {args.block} tokens; median of {args.repeats} steps")
    print_table(["mode", "step ms", "speed-up vs fp32"], rows)
    if args.profile:
        profile(fm, x, y)


def profile(model, x, y) -> None:
    """A torch.profiler table of three training steps of ``model`` (after :func:`step_ms` warmed
    it up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
    print("\nprofile of 3 tvm-backend steps, by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
