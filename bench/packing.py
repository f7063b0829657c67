"""Time the TVM backend's operand preparation on its own: the quantize kernel, the A and B pack
kernels, the forward im2col and the bias-gradient code sums, on shapes from the ResNet-20 and
Transformer d512 training steps. Medians of ``--repeats`` calls after one warm-up call.

The kernels are looked up by name in ``fraccompile.targets`` (``quantize.kernel``,
``pack.a_kernel``, ``pack.b_kernel``), so the same script times an older checkout of the package:

    python bench/packing.py [--repeats 20]
    PYTHONPATH=/path/to/old/checkout python bench/packing.py     # the kernels of that checkout

Two rows time torch baselines written here: im2col as one copy per kernel offset (the backend's
method before it became one strided copy), and torch's int64 reduction of int8 codes over a list
of dims (before the int32 row sums).
"""

from __future__ import annotations

import argparse
import statistics
import time

from fraccompile.targets.kernels import pack, quantize  # isort: skip  (sets TVM's thread count first)

import torch
import torch.nn.functional as F
from _common import header, print_table


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def im2col_per_offset(x: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1, padding 1 patches of channels-last ``x (N, H, W, C)``: one copy per offset."""
    N, H, W, C = x.shape
    cols = torch.zeros((N, H, W, 3, 3, C), dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            y0, y1, x0, x1 = max(0, 1 - i), min(H, H + 1 - i), max(0, 1 - j), min(W, W + 1 - j)
            cols[:, y0:y1, x0:x1, i, j] = x[:, y0 + i - 1 : y1 + i - 1, x0 + j - 1 : x1 + j - 1]
    return cols.view(N * H * W, 9 * C)


def im2col_strided(x: torch.Tensor) -> torch.Tensor:
    """The same patches as one strided view of the padded codes, materialized by one copy (the
    method of ``fraccompile.targets.backend.roles._im2col``)."""
    N, H, W, C = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    s = xp.stride()
    return xp.as_strided((N, H, W, 3, 3, C), (s[0], s[1], s[2], s[1], s[2], s[3])).reshape(N * H * W, 9 * C)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    header("TVM backend operand preparation: quantize, pack, im2col, bias sums")
    print(f"package: {pack.__file__}")
    gen = torch.Generator().manual_seed(0)
    flip = torch.tensor([128], dtype=torch.uint8)
    rows = []

    def row(what, shape, fn):
        rows.append([what, shape, f"{median_ms(fn, args.repeats):.3f}"])

    n = 4 * 2**20
    x = torch.randn(n, generator=gen)
    scale, bounds, u = torch.tensor([0.02]), torch.tensor([-127.0, 127.0, 0.0, 0.0]), torch.rand(n)
    q = torch.empty(n, dtype=torch.int8)
    rn, sr = quantize.kernel("int8", False), quantize.kernel("int8", True)
    row("quantize, round to nearest", "4M fp32", lambda: rn(x, scale, bounds, q))
    row("quantize, stochastic", "4M fp32", lambda: sr(x, scale, bounds, u, q))
    row("torch.rand (the stochastic kernel's input)", "4M fp32", lambda: torch.rand(n))
    if hasattr(quantize, "counter_definition"):  # the counter-noise kernel draws nothing
        src = quantize.kernel("int8", True, "counter")
        seed = torch.tensor([7], dtype=torch.int32)
        row(
            "quantize, stochastic, counter noise",
            "4M fp32",
            lambda: src(x.view(-1, 1, 1024), scale, bounds, seed, q.view(-1, 1, 1024)),
        )
    act = torch.randn(128, 16, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    row("aminmax of a channels-last tensor (torch)", "128x16x32x32 CL", lambda: torch.aminmax(act))
    row("aminmax in memory order (torch)", "128x16x32x32 CL", lambda: torch.aminmax(act.permute(0, 2, 3, 1)))
    if hasattr(quantize, "dequant_kernel"):  # the GEMM epilogue: int32 -> fp32
        m_, n_ = 131072, 16
        c = torch.randint(-(2**20), 2**20, (1, m_, n_), dtype=torch.int32, generator=gen)
        rc, cc = torch.zeros(1, m_, dtype=torch.int32), torch.zeros(1, n_, dtype=torch.int32)
        sc, bi, out32 = torch.rand(n_), torch.randn(n_), torch.empty(1, m_, n_)
        dq = quantize.dequant_kernel()
        row("dequantize + bias, one kernel", "131072x16 int32", lambda: dq(c, rc, cc, sc, bi, out32))
        row("dequantize + bias (torch)", "131072x16 int32", lambda: torch.mul(c, sc).add_(bi))

    for layout, (m, k), (mp, kp) in [
        ("mk", (2048, 512), (2052, 512)),
        ("km", (2048, 512), (2052, 512)),
        ("km", (16, 131072), (18, 131072)),
    ]:
        src_shape = (1, m, k) if layout == "mk" else (1, k, m)
        src = torch.randint(0, 256, src_shape, dtype=torch.uint8, generator=gen)
        out = torch.empty((1, mp, kp), dtype=torch.uint8)
        kernel = pack.a_kernel(layout)
        row(
            f"pack A, {layout}",
            f"{m}x{k} -> {mp}x{kp}",
            lambda kernel=kernel, src=src, out=out: kernel(src, flip, out),
        )

    for layout, (nn, k) in [("kn", (2048, 2048)), ("kn", (512, 2048)), ("nk", (512, 512))]:
        src_shape = (1, nn, k) if layout == "nk" else (1, k, nn)
        src = torch.randint(0, 256, src_shape, dtype=torch.uint8, generator=gen)
        out = torch.empty((1, -(-(nn + 1) // 16), k // 4, 16, 4), dtype=torch.uint8)
        kernel = pack.b_kernel(layout)
        row(f"pack B, {layout}", f"{nn}x{k}", lambda kernel=kernel, src=src, out=out: kernel(src, flip, out))

    codes = torch.randint(0, 256, (128, 32, 32, 16), dtype=torch.uint8, generator=gen)
    assert torch.equal(im2col_per_offset(codes), im2col_strided(codes))
    row("im2col 3x3, one copy per offset (torch)", "128x32x32x16", lambda: im2col_per_offset(codes))
    row("im2col 3x3, one strided copy (torch)", "128x32x32x16", lambda: im2col_strided(codes))

    dy = torch.randint(-128, 128, (2048, 2048), dtype=torch.int8, generator=gen)
    row(
        "bias sums, int64 over dims (torch)",
        "2048x2048 int8",
        lambda: dy.view(32, 64, 2048).sum((0, 1), dtype=torch.int64),
    )
    row("bias sums, int32 rows (torch)", "2048x2048 int8", lambda: dy.sum(0, dtype=torch.int32))
    dc = torch.randint(-128, 128, (128, 16, 32, 32), dtype=torch.int8, generator=gen)
    dc = dc.contiguous(memory_format=torch.channels_last)  # a conv gradient: 16 channels
    row(
        "bias sums, int64 over dims (torch)",
        "128x16x32x32 int8 CL",
        lambda: dc.sum((0, 2, 3), dtype=torch.int64),
    )
    row(
        "bias sums, int32 rows (torch)",
        "128x16x32x32 int8 CL",
        lambda: dc.permute(0, 2, 3, 1).reshape(-1, 16).sum(0, dtype=torch.int32),
    )

    print(f"median ms over {args.repeats} calls")
    print_table(["what", "shape", "ms"], rows)


if __name__ == "__main__":
    main()
