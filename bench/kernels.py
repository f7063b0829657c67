"""GEMM throughput of the TVM backend per role (FW, EB, GC) on the real training shapes of the
example models, next to torch fp32 and torch's int8 GEMM (``torch._int_mm``, oneDNN).

Every quantized site (those running on the ``tvm`` backend at a=w=g=8, symmetric) is turned into
the GEMMs the backend runs for it (:mod:`fraccompile.targets.backend`):

=======  ==========================================  =============================================
role     conv (im2col, P output positions)           linear (R rows) / matmul ``x @ y``, batch B
=======  ==========================================  =============================================
FW       G, M=N·P, N=OC/G, K=C/G·kh·kw               (1, R, out, in) / (B, M, N, K)
EB       fp32 (per-channel weight scales)            fp32 for linear / (B, M, N=K, K=N)
GC       G, M=OC/G, N=C/G·kh·kw, K=N·P  (dw = dyᵀ·x)  (1, out, in, R) / (B, M=K, N, K=M)
=======  ==========================================  =============================================

Columns, each total ops (2·G·M·N·K per GEMM, summed over the model's sites) over the total of
the per-GEMM median times:

* kernel: the TVM kernel alone on operands already padded and packed: for an ungrouped 2-D conv's
  FW and (stride 1) GC the implicit-GEMM conv kernels the backend runs (``targets/kernels/conv.py``; the
  ops counted are still the GEMM's; FW in its int32 form, where the backend runs the form with
  the dequantize in the write-back, ``conv_dq``, when no output channel is padding), else the
  GEMM;
* kernel+packing: ``TVMBackend.gemm`` on int8/uint8 codes in the layout the backend passes them
  (sign shift, padding, packing of B, sign corrections); for an ungrouped 2-D conv's FW and GC,
  the backend's ``fw`` / ``gc`` on channels-last codes (implicit GEMM, or patches packed straight
  from the activations; FW with its dequantize epilogue); for the fp32 EB rows, the backend's EB
  (dequantize + the fp32 op);
* torch fp32: what fp32 training runs for the role (conv: ``F.conv2d`` / ``convolution_backward``
  on the original conv shapes; linear and matmul: ``torch.matmul`` of the GEMM);
* int_mm: ``torch._int_mm`` (int8 x int8 -> int32, oneDNN) on pre-padded 2-D operands
  (M > 16, K and N multiples of 8), one call per group.

    python bench/kernels.py [--repeats 5] [--models resnet20,mobilenetv2,transformer] [--verbose]
                            [--cold]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import tempfile
import time
from dataclasses import dataclass

# fraccompile.targets sets TVM_NUM_THREADS before importing tvm: import it before any torch work
from fraccompile.targets.kernels import gemm as tgemm  # isort: skip
from fraccompile.targets.backend import IntCodes, TVMBackend  # isort: skip
from fraccompile.targets.backend.gemm_runtime import MAX_K  # isort: skip
from fraccompile.targets.runtime.cache import KernelCache, cache_dir  # isort: skip
from fraccompile.targets.kernels import conv as tconv  # isort: skip
from fraccompile.targets.runtime import threads  # isort: skip
from fraccompile.targets.runtime.library import KernelRef  # isort: skip

import torch
import torch.nn.functional as F
from _common import header, median_ms, print_table

import fraccompile
from fraccompile.examples import mobilenetv2_cifar, resnet_cifar, transformer_lm
from fraccompile.ops.contract import SiteCall
from fraccompile.ops.modules import FracOp
from fraccompile.ops.spec import Precision, SiteSpec

MODELS = {
    "resnet20": ("ResNet-20", resnet_cifar.resnet20, lambda: torch.randn(128, 3, 32, 32)),
    "mobilenetv2": ("MobileNetV2", mobilenetv2_cifar.model, lambda: torch.randn(128, 3, 32, 32)),
    "transformer": ("Transformer d128", transformer_lm.model, lambda: torch.randint(0, 65, (128, 64))),
}
ROLES = ("FW", "EB", "EB fp32", "GC")


@dataclass(frozen=True)
class Gemm:
    """One GEMM ``C[g] = A[g] @ B[g]^T`` as the backend runs it, with what the other columns need.

    ``a_layout``: ``mk`` (A contiguous), ``km`` (A a transposed view of a (G, K, M) tensor) or
    ``kgm`` (``permute(1, 2, 0)`` of a (K, G, M) tensor: conv GC's ``dy``); ``b_layout``: ``nk``
    or ``kn`` (transposed view of (G, K, N)). ``conv``: (x shape, w shape, stride, padding,
    dilation, groups) of a conv site, for the fp32 column."""

    role: str
    kind: str
    G: int
    M: int
    N: int
    K: int
    a_signed: bool = False
    b_signed: bool = True
    a_layout: str = "mk"
    b_layout: str = "nk"
    conv: tuple | None = None
    out_shape: tuple | None = None  # linear EB fp32: the dy shape

    @property
    def ops(self) -> int:
        return 2 * self.G * self.M * self.N * self.K

    def label(self) -> str:
        return f"{self.G}x{self.M}x{self.N}x{self.K}"


# -- the GEMMs of a model --------------------------------------------------------------------------
def site_signs(fm, x) -> dict[str, tuple[bool, bool]]:
    """Whether each site's input (and a matmul's second operand) has negative values: the codes
    are then int8, else uint8 (symmetric scheme)."""
    signs = {}

    def hook(mod, args):
        y_neg = bool(args[1].min() < 0) if mod.spec.kind == "matmul" else True
        signs[mod.site] = (bool(args[0].min() < 0), y_neg)

    handles = [m.register_forward_pre_hook(hook) for m in fm.modules() if isinstance(m, FracOp)]
    with torch.no_grad():
        fm(x)
    for h in handles:
        h.remove()
    return signs


def model_gemms(key: str) -> collections.Counter:
    """``Counter(Gemm -> number of times it runs in one training step)`` of a model's tvm sites."""
    _, make, make_x = MODELS[key]
    torch.manual_seed(0)
    x = make_x()
    cfg = fraccompile.FracConfig(a=8, w=8, g=8, scheme="symmetric", backend="reference")
    fm = fraccompile.compile(make(), x, config=cfg)
    ops = {m.site: m for m in fm.modules() if isinstance(m, FracOp)}
    signs = site_signs(fm, x)
    probe = TVMBackend()  # its kernel cache is created on first use only
    out = collections.Counter()
    for s in fm.sites:
        if s.full_precision or s.name not in ops:
            continue
        spec = ops[s.name].spec
        call = SiteCall(s.name, spec, Precision(8, 8, 8), "symmetric", weight_shape=tuple(s.weight_shape))
        if probe.unsupported_reason(call) is not None:
            continue
        x_neg, y_neg = signs[s.name]
        for g in site_gemms(spec, s.input_shape, s.weight_shape, s.output_shape, x_neg, y_neg):
            out[g] += s.calls
    return out


def site_gemms(spec, x_shape, w_shape, y_shape, x_neg: bool, y_neg: bool) -> list[Gemm]:
    if spec.kind == "conv":
        G = spec.groups
        N, P = x_shape[0], math.prod(y_shape[2:])
        OCg, kc = w_shape[0] // G, w_shape[1] * math.prod(w_shape[2:])
        conv = (
            tuple(x_shape),
            tuple(w_shape),
            tuple(spec.stride),
            tuple(spec.gemm_padding(w_shape)),
            tuple(spec.dilation),
            G,
        )
        return [
            Gemm("FW", "conv", G, N * P, OCg, kc, x_neg, True, "mk", "nk", conv),
            Gemm("EB fp32", "conv", G, N * P, kc, OCg, conv=conv),
            Gemm("GC", "conv", G, OCg, kc, N * P, True, x_neg, "kgm", "kn", conv),
        ]
    if spec.kind == "linear":
        R, cin, cout = math.prod(x_shape[:-1]), x_shape[-1], w_shape[0]
        return [
            Gemm("FW", "linear", 1, R, cout, cin, x_neg, True, "mk", "nk"),
            Gemm("EB fp32", "linear", 1, R, cin, cout, out_shape=tuple(y_shape)),
            Gemm("GC", "linear", 1, cout, cin, R, True, x_neg, "km", "kn"),
        ]
    batch = torch.broadcast_shapes(tuple(x_shape[:-2]), tuple(w_shape[:-2]))
    B, M, K, N = math.prod(batch), x_shape[-2], x_shape[-1], w_shape[-1]
    return [
        Gemm("FW", "matmul", B, M, N, K, x_neg, y_neg, "mk", "kn"),
        Gemm("EB", "matmul", B, M, K, N, True, y_neg, "mk", "nk"),
        Gemm("GC", "matmul", B, K, N, M, x_neg, True, "km", "kn"),
    ]


# -- operands --------------------------------------------------------------------------------------
_POOL: dict = {}


def rand_int(shape, dtype: torch.dtype, lo: int, hi: int) -> torch.Tensor:
    """Random integers in ``[lo, hi)``: 1 MiB of ``torch.randint`` tiled (the GEMMs' speed does
    not depend on the values, and ``randint`` of the largest operands takes seconds)."""
    pool = _POOL.get((dtype, lo, hi))
    if pool is None:
        pool = _POOL[(dtype, lo, hi)] = torch.randint(lo, hi, (1 << 20,), dtype=dtype)
    n = math.prod(shape)
    return pool.repeat(-(-n // pool.numel()))[:n].view(shape)


def codes(shape, signed: bool) -> torch.Tensor:
    if signed:
        return rand_int(shape, torch.int8, -127, 128)
    return rand_int(shape, torch.uint8, 0, 256)


def chunks(K: int) -> list[int]:
    """The reduction lengths the backend splits ``K`` into (int32-safe partial sums)."""
    return [min(MAX_K, K - k0) for k0 in range(0, K, MAX_K)]


def implicit_shapes(g: Gemm, backend: TVMBackend) -> list | None:
    """The implicit-GEMM conv kernel shapes (:mod:`fraccompile.targets.kernels.conv`) the backend runs for
    a 2-D conv role on channels-last codes, else None (it runs the GEMM of ``g``)."""
    if g.kind != "conv" or g.G != 1 or len(g.conv[2]) != 2 or not backend._vnni:
        return None
    x_shape, w_shape, stride, padding, dilation, _ = g.conv
    xl_shape = (x_shape[0], *x_shape[2:], x_shape[1])
    out_sp = conv_out_shape(g.conv)[2:]
    if g.role == "FW":
        s = tconv.forward_shape(xl_shape, w_shape, stride, padding, dilation, out_sp, MAX_K)
        return None if s is None else [s]
    if g.role == "GC":
        return tconv.gc_shapes(xl_shape, w_shape, stride, padding, dilation, out_sp, MAX_K)
    return None


def kernel_fn(g: Gemm, cache: KernelCache, backend: TVMBackend):
    """(a) the TVM kernel(s) alone on padded, packed operands: the implicit-GEMM conv kernels
    where the backend runs them, else the GEMM."""
    calls = []
    shapes = implicit_shapes(g, backend)
    if shapes is not None:
        for s in shapes:
            if isinstance(s, tconv.ConvShape):
                ref = KernelRef("conv", s.args)
                X = codes((s.n, s.hp, s.wp, s.c), False)
                B = codes((s.ocp // 16, s.kh * s.kw * s.c // 4, 16, 4), True)
                C = torch.empty((s.n, s.oh, s.ow, s.ocp), dtype=torch.int32)
            else:
                ref = KernelRef("gc", s.args)
                X = codes((s.n, s.c, s.hp, s.wp), False)
                B = codes((s.ocp // 16, s.n * s.oh * s.ow // 4, 16, 4), True)
                C = torch.empty((s.kh, s.kw, s.c, s.ocp), dtype=torch.int32)
            calls.append((backend.kernel(ref), X, B, C))
        return lambda: [fn(X, B, C) for fn, X, B, C in calls]
    for k in chunks(g.K):
        shape = tgemm.padded(g.G, g.M, g.N, k)
        A = codes((g.G, shape.m, shape.k), False)
        B = codes((g.G, shape.n // 16, shape.k // 4, 16, 4), True)
        C = torch.empty((g.G, shape.m, shape.n), dtype=torch.int32)
        calls.append((cache.get(shape), A, B, C))

    def run():
        for fn, A, B, C in calls:
            fn(A, B, C)

    return run


def backend_fn(g: Gemm, backend: TVMBackend):
    """(b) the role end to end: ``TVMBackend.gemm`` on codes in the backend's layout, or for an
    fp32 EB the backend's ``eb`` (dequantize + fp32 op)."""
    if g.role == "EB fp32":
        return backend_eb_fp32(g, backend)
    if g.role in ("FW", "GC") and g.kind == "conv" and g.G == 1 and len(g.conv[2]) == 2:
        return backend_conv(g, backend)
    if g.a_layout == "mk":
        a = codes((g.G, g.M, g.K), g.a_signed)
    elif g.a_layout == "km":
        a = codes((g.G, g.K, g.M), g.a_signed).mT
    else:  # kgm: conv GC's dyᵀ, a permute(1, 2, 0) of (K, G, M)
        a = codes((g.K, g.G, g.M), g.a_signed).permute(1, 2, 0)
    if g.b_layout == "nk":
        b = codes((g.G, g.N, g.K), g.b_signed)
    else:  # kn
        b = codes((g.G, g.K, g.N), g.b_signed).mT
    return lambda: backend.gemm(a, b)


def backend_conv(g: Gemm, backend: TVMBackend):
    """A 2-D conv's forward or weight gradient as the backend runs it on channels-last codes: an
    implicit GEMM, or the patches packed straight from the codes by a TVM kernel (no im2col)
    and the GEMM; the forward includes its dequantize epilogue."""
    x_shape, w_shape, stride, padding, dilation, groups = g.conv
    spec = SiteSpec.conv(2, stride, padding, dilation, groups)
    y_shape = conv_out_shape(g.conv)
    cl = torch.channels_last
    x_signed = g.a_signed if g.role == "FW" else g.b_signed
    xq = IntCodes(codes(x_shape, x_signed).contiguous(memory_format=cl), torch.tensor(0.01), x_signed)
    if g.role == "FW":
        wq = IntCodes(codes(w_shape, True), torch.rand(w_shape[0]) + 0.5, True)
        return lambda: backend.fw(spec, xq, wq, x_shape, w_shape)
    dyq = IntCodes(codes(y_shape, True).contiguous(memory_format=cl), torch.tensor(0.01), True)
    return lambda: backend.gc(spec, xq, dyq, x_shape, w_shape)


def backend_eb_fp32(g: Gemm, backend: TVMBackend):
    if g.kind == "conv":
        x_shape, w_shape, stride, padding, dilation, groups = g.conv
        spec = SiteSpec.conv(len(stride), stride, padding, dilation, groups)
        y_shape = conv_out_shape(g.conv)
        oc = w_shape[0]
        wscale = torch.rand(oc, *([1] * (len(w_shape) - 1))) + 0.5
    else:
        spec = SiteSpec("linear", "linear")
        x_shape, w_shape, y_shape = (g.M, g.N), (g.K, g.N), g.out_shape
        wscale = torch.rand(g.K, 1) + 0.5
    dyq = IntCodes(codes(y_shape, True), torch.tensor(0.01), True)
    wq = IntCodes(codes(w_shape, True), wscale, True)
    xq = IntCodes(codes(x_shape, False), torch.tensor(0.01), False)
    return lambda: backend.eb(spec, dyq, xq, wq, x_shape, w_shape)


def conv_out_shape(conv) -> tuple:
    x_shape, w_shape, stride, padding, dilation, _ = conv
    sp = [
        (x_shape[2 + d] + 2 * padding[d] - dilation[d] * (w_shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(len(stride))
    ]
    return (x_shape[0], w_shape[0], *sp)


def fp32_fn(g: Gemm):
    """(c) what fp32 training runs for this role."""
    if g.kind == "conv":
        x_shape, w_shape, stride, padding, dilation, groups = g.conv
        x, w = torch.randn(x_shape), torch.randn(w_shape)
        if g.role == "FW":
            return lambda: F.conv2d(x, w, None, stride, padding, dilation, groups)
        dy = torch.randn(conv_out_shape(g.conv))
        mask = [g.role != "GC", g.role == "GC", False]
        n = len(stride)
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, list(stride), list(padding), list(dilation), False, [0] * n, groups, mask
        )
    a, b = torch.randn(g.G, g.M, g.K), torch.randn(g.G, g.N, g.K)
    if g.G == 1:
        a, b = a[0], b[0]
    return lambda: torch.matmul(a, b.mT)


def int_mm_fn(g: Gemm):
    """(d) ``torch._int_mm`` per group on operands padded to its constraints; None if impossible."""
    if g.role == "EB fp32":
        return None
    m, k, n = max(g.M, 17), -(-g.K // 8) * 8, -(-g.N // 8) * 8
    A, B = codes((g.G, m, k), True), codes((g.G, k, n), True)
    pairs = list(zip(A.unbind(0), B.unbind(0)))
    try:
        torch._int_mm(*pairs[0])
    except RuntimeError:
        return None

    def run():
        for a, b in pairs:
            torch._int_mm(a, b)

    return run


# -- measuring -------------------------------------------------------------------------------------
def measure(g: Gemm, cache, backend, repeats: int) -> dict[str, float | None]:
    """Median ms of the four columns for one GEMM (None where the column does not apply)."""
    makers = {
        "kernel": lambda: kernel_fn(g, cache, backend) if g.role != "EB fp32" else None,
        "packing": lambda: backend_fn(g, backend),
        "fp32": lambda: fp32_fn(g),
        "int_mm": lambda: int_mm_fn(g),
    }
    out = {}
    for k, make in makers.items():  # one at a time: the operands of a column are freed after it
        f = make()
        out[k] = median_ms(f, repeats, warmup=1) if f is not None else None
        del f
    return out


def gops(ops: float, ms: float | None) -> str:
    return "-" if not ms else f"{ops / ms / 1e6:.1f}"


def ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{den / num:.2f}x"  # times: speed-up of num over den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument("--verbose", action="store_true", help="also print every distinct GEMM")
    parser.add_argument(
        "--cold", action="store_true", help="build every kernel in a fresh temporary cache directory"
    )
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in MODELS:
            parser.error(f"unknown model {k!r}; choose from {', '.join(MODELS)}")
    header("GEMM throughput per role: TVM int8 kernels vs torch fp32 and torch._int_mm")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"TVM kernels' parallel loops on {threads.pool()}")

    tmp = tempfile.TemporaryDirectory(prefix="fraccompile-kernels-") if args.cold else None
    cache = KernelCache(tmp.name if tmp else None)
    backend = TVMBackend(cache)
    square = Gemm("FW", "square", 1, 1024, 1024, 1024, False, True)
    work: list[tuple[str, collections.Counter]] = [(MODELS[k][0], model_gemms(k)) for k in keys]
    work.append(("1024^3 (u8 x s8)", collections.Counter({square: 1})))

    # warm the kernel cache: every padded shape once, timed as the cold build
    t0 = time.perf_counter()
    shapes = {
        tgemm.padded(g.G, g.M, g.N, k)
        for _, gs in work
        for g in gs
        if g.role != "EB fp32"
        for k in chunks(g.K)
    }
    for s in sorted(shapes, key=lambda s: s.name):
        cache.get(s)
    warm_s = time.perf_counter() - t0

    rows, detail = [], []
    for model, gs in work:
        for role in ROLES:
            sel = [(g, n) for g, n in gs.items() if g.role == role]
            if not sel:
                continue
            tot = {"kernel": 0.0, "packing": 0.0, "fp32": 0.0, "int_mm": 0.0}
            ops = 0
            for g, n in sorted(sel, key=lambda gn: -gn[0].ops * gn[1]):
                ms = measure(g, cache, backend, args.repeats)
                ops += g.ops * n
                for k in tot:
                    tot[k] = None if tot[k] is None or ms[k] is None else tot[k] + ms[k] * n
                detail.append(
                    [
                        model,
                        role,
                        g.kind,
                        g.label(),
                        str(n),
                        *(gops(g.ops, ms[k]) for k in tot),
                        ratio(ms["kernel"], ms["int_mm"]),
                        ratio(ms["kernel"], ms["fp32"]),
                    ]
                )
            rows.append(
                [
                    model,
                    role,
                    str(sum(n for _, n in sel)),
                    *(gops(ops, tot[k]) for k in tot),
                    ratio(tot["kernel"], tot["int_mm"]),
                    ratio(tot["kernel"], tot["fp32"]),
                ]
            )

    cols = [
        "GOPS kernel",
        "GOPS kernel+packing",
        "GOPS torch fp32",
        "GOPS int_mm",
        "kernel/int_mm",
        "kernel/fp32",
    ]
    print(
        f"a=w=g=8 symmetric, batch 128 (Transformer: 128 x 64 tokens); median of {args.repeats} "
        "calls per GEMM; GOPS = total ops / total median time of the role's GEMMs"
    )
    print_table(["model", "role", "GEMMs", *cols], rows)
    st = cache.stats
    print(
        f"\nkernel cache ({tmp.name if tmp else cache_dir()}): {len(shapes)} kernels; "
        f"{st.built} built in {sum(st.build_seconds):.1f} s (cold), {st.loaded - st.built} "
        f"loaded from disk in {sum(st.load_seconds):.2f} s; warm-up took {warm_s:.1f} s"
    )
    print(
        "EB fp32: EB of conv/linear weight sites runs in fp32 in this backend (per-channel "
        "weight scales sit on its reduction axis); 'kernel+packing' is the backend's EB "
        "(dequantize + fp32 op)"
    )
    if args.verbose:
        print()
        print_table(["model", "role", "site", "GxMxNxK", "count", *cols], detail)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
