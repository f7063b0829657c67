"""GEMM throughput on an NVIDIA GPU: TVM mma and dp4a kernels vs torch bf16 matmul and torch._int_mm.

The TVM kernels (:class:`CudaGemm`: tensor-core mma, the default, and dp4a) next to torch's
bf16 matmul and ``torch._int_mm`` (int8 × int8 -> int32, cuBLASLt), on the GEMMs of the three
roles of a Transformer's linear layers and on 4096³.

The Transformer: d_model 512, batch 128, block 64, so R = 128·64 = 8192 token rows; per block the
q, k, v and output projections (512 -> 512, 4 of them), fc1 (512 -> 2048) and fc2 (2048 -> 512).
A linear ``in -> out`` is three GEMMs ``C = A·Bᵀ`` (``M × N``, reduction ``K``):

====  =====================  ==============
role  GEMM                   M, N, K
====  =====================  ==============
FW    y = x·Wᵀ               R, out, in
EB    dx = dy·W              R, in, out
GC    dW = dyᵀ·x             out, in, R
====  =====================  ==============

Columns (GOPS = 2·M·N·K / median time; per role: total ops over the count-weighted sum of the
per-GEMM medians):

* mma kernel, dp4a kernel: the TVM kernel alone (``CudaGemm._s8_gemm``, with the zeroing of C
  for a split-K mma shape) on int8 operands already padded;
* CudaGemm u8·s8: ``CudaGemm.gemm`` (mma) on uint8 A and int8 B codes, end to end (shift of A,
  padding, the kernel, the sign correction);
* torch bf16: ``a @ b.mT`` in bfloat16 (tensor cores);
* int_mm: ``torch._int_mm(a, b.mT)`` on int8 (tensor cores);
* exact: the mma and dp4a results equal an fp64 matmul of the same codes (exact at these sizes).

Times are CUDA-event medians over ``--repeats`` calls after warm-up (kernel builds with nvcc are
cached on disk, see :mod:`fraccompile.targets.runtime.cuda_driver`).

    python bench/gpu_kernels.py [--repeats 20] [--verbose]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import subprocess
import sys
import time

import torch
from _common import machine, print_table

from fraccompile.targets.runtime.cuda_driver import CudaGemm, cache_dir, gpu_unavailable_reason

D_MODEL, BATCH, BLOCK = 512, 128, 64
LINEARS = [
    ("qkv/proj", D_MODEL, D_MODEL, 4),
    ("fc1", D_MODEL, 4 * D_MODEL, 1),
    ("fc2", 4 * D_MODEL, D_MODEL, 1),
]  # (name, in, out, count per block)
ROLES = ("FW", "EB", "GC")
SQUARE = 4096


def transformer_gemms() -> list[tuple[str, str, int, int, int, int]]:
    """``(role, layer, M, N, K, count)`` of the linear layers of one Transformer block."""
    R = BATCH * BLOCK
    out = []
    for role in ROLES:
        for name, cin, cout, count in LINEARS:
            M, N, K = {"FW": (R, cout, cin), "EB": (R, cin, cout), "GC": (cout, cin, R)}[role]
            out.append((role, name, M, N, K, count))
    return out


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nvcc_version() -> str:
    from fraccompile.targets.kernels import cuda

    reason = cuda.nvcc_unavailable_reason()
    if reason:
        return reason
    out = subprocess.run([cuda.nvcc_path(), "--version"], capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[0].strip() if lines else out.strip()[-80:]


def header() -> None:
    props = torch.cuda.get_device_properties(0)
    print("# GEMM throughput on the GPU: TVM mma and dp4a kernels vs torch bf16 and torch._int_mm")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {props.name} (compute capability {props.major}.{props.minor}, "
        f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"TVM {_version('apache-tvm')}, nvcc: {nvcc_version()}"
    )
    print(f"host: {machine()}")
    print()


def measure(gemms: dict, M: int, N: int, K: int, repeats: int, have_nvcc: bool) -> dict:
    """Median ms of each column for one ``M × N × K`` GEMM, and whether mma and dp4a were exact."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randint(-128, 128, (1, M, K), dtype=torch.int8, device=dev, generator=gen)
    b = torch.randint(-128, 128, (1, N, K), dtype=torch.int8, device=dev, generator=gen)
    out: dict = {"build_s": 0.0}
    if have_nvcc:
        ref = (a[0].double() @ b[0].double().mT).round().long()
        exact = []
        for kind, gemm in gemms.items():
            shape = gemm.padded_shape(1, M, N, K)
            ap = torch.zeros((1, shape.m, shape.k), dtype=torch.int8, device=dev)
            bp = torch.zeros((1, shape.n, shape.k), dtype=torch.int8, device=dev)
            ap[:, :M, :K], bp[:, :N, :K] = a, b
            t0 = time.perf_counter()
            c = gemm._s8_gemm(ap, bp, shape)[:, :M, :N]  # builds (or loads) the kernel
            torch.cuda.synchronize()
            out["build_s"] += time.perf_counter() - t0
            exact.append(bool(torch.equal(c[0].long(), ref)))
            out[kind] = median_ms(lambda g=gemm, s=shape, x=ap, y=bp: g._s8_gemm(x, y, s), repeats)
            del ap, bp, c
        out["exact"] = all(exact)
        au = torch.bitwise_xor(a, -128).view(torch.uint8)
        out["cudagemm"] = median_ms(lambda: gemms["mma"].gemm(au, b), repeats)
        del au, ref
    a2, b2 = a[0], b[0]
    abf, bbf = a2.to(torch.bfloat16), b2.to(torch.bfloat16)
    out["bf16"] = median_ms(lambda: abf @ bbf.mT, repeats)
    try:
        torch._int_mm(a2, b2.mT)
        out["int_mm"] = median_ms(lambda: torch._int_mm(a2, b2.mT), repeats)
    except RuntimeError as e:  # shape constraints (M > 16, K and N multiples of 8) or no support
        out["int_mm"] = None
        out["int_mm_error"] = str(e).splitlines()[0]
    return out


def gops(ops: float, ms: float | None) -> str:
    return "-" if not ms else f"{ops / ms / 1e6:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--verbose", action="store_true", help="also print every distinct GEMM")
    args = parser.parse_args()
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"no GPU: skipped ({reason})")
        return 0
    from fraccompile.targets.kernels import cuda

    have_nvcc = cuda.nvcc_unavailable_reason() is None
    header()
    if not have_nvcc:
        print(f"mma and dp4a columns skipped: {cuda.nvcc_unavailable_reason()}\n")

    gemms = {"mma": CudaGemm(kernel="mma"), "dp4a": CudaGemm(kernel="dp4a")}
    work = [(role, name, M, N, K, n) for role, name, M, N, K, n in transformer_gemms()]
    work.append(("square", f"{SQUARE}^3", SQUARE, SQUARE, SQUARE, 1))
    cols = ("mma", "dp4a", "cudagemm", "bf16", "int_mm")
    results = {}
    for role, name, M, N, K, _ in work:
        results[(role, name)] = measure(gemms, M, N, K, args.repeats, have_nvcc)

    rows, detail = [], []
    for role in (*ROLES, "square"):
        sel = [w for w in work if w[0] == role]
        ops = sum(2 * M * N * K * n for _, _, M, N, K, n in sel)
        tot = {}
        for c in cols:
            ms = [results[(r, nm)].get(c) for r, nm, *_ in sel]
            tot[c] = None if any(m is None for m in ms) else sum(m * w[5] for m, w in zip(ms, sel))
        exact = [results[(r, nm)].get("exact") for r, nm, *_ in sel]
        rows.append(
            [
                role if role != "square" else f"{SQUARE}³",
                str(sum(w[5] for w in sel)),
                *(gops(ops, tot[c]) for c in cols),
                "-" if None in exact else ("yes" if all(exact) else "NO"),
            ]
        )
        for r, nm, M, N, K, n in sel:
            res = results[(r, nm)]
            detail.append(
                [
                    r,
                    nm,
                    f"{M}x{N}x{K}",
                    str(n),
                    *(gops(2 * M * N * K, res.get(c)) for c in cols),
                    {True: "yes", False: "NO", None: "-"}[res.get("exact")],
                ]
            )
    heads = [
        "GOPS mma kernel",
        "GOPS dp4a kernel",
        "GOPS CudaGemm u8·s8",
        "GOPS torch bf16",
        "GOPS int_mm",
        "exact",
    ]
    print(
        f"Transformer d_model {D_MODEL}, batch {BATCH}, block {BLOCK} (R = {BATCH * BLOCK} "
        f"rows); linear layers of one block; median of {args.repeats} calls per GEMM"
    )
    print_table(["role", "GEMMs", *heads], rows)
    if args.verbose:
        print()
        print_table(["role", "layer", "MxNxK", "count", *heads], detail)
    builds = [r["build_s"] for r in results.values() if r.get("build_s")]
    if builds:
        print(
            f"\nkernels ({cache_dir()}): first call per shape (nvcc build or disk load) "
            f"{sum(builds):.1f} s in total"
        )
    errors = {r["int_mm_error"] for r in results.values() if "int_mm_error" in r}
    for e in sorted(errors):
        print(f"int_mm unavailable for some shapes: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
