"""The tvm backend's GPU branch without a GPU: CUDA tensors quantized by the TVM-generated
quantization kernels (fraccompile.targets.kernels.cuda_quantize, run here by the CPU emulator of
tests/_cuda_quant_helpers.py) and their GEMMs on ``CudaGemm`` with the kernel call replaced by an
exact torch stand-in: the backend takes its GPU branch on CPU tensors (``on_gpu`` patched), and a
step gives the reference backend's loss and gradients. Also: the codes are the reference
quantizer's bit for bit, the GEMM's exact offset correction, the quantization runtime's launch
convention against a stand-in driver, and a step that reads nothing back on the host.

GPU-only tests (real launches) skip without a GPU and nvcc."""

from __future__ import annotations

import contextlib
import copy
import ctypes
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _cuda_helpers import gpu
from _cuda_quant_helpers import EmulatedQuantKernels
from _tvm_helpers import C2, TOL, _gated, rel

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops.modules import FracOp
from fraccompile.ops.quantizers import (
    channel_range,
    qparams_from_range,
    quantize_to_int,
    tensor_range,
    weight_range,
)
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from fraccompile.targets.kernels import cuda_quantize

    return EmulatedQuantKernels(cuda_quantize, tmp_path_factory.mktemp("emu"))


def _stand_in_gemm():
    from fraccompile.targets.runtime.cuda_driver import CudaGemm

    class StandIn(CudaGemm):
        """The kernel call as torch: contiguous int8 operands padded to the kernel's shape."""

        calls = padded = 0

        def gemm_padded(self, *args, **kwargs):  # operands the quantize kernel wrote padded
            StandIn.padded += 1
            return super().gemm_padded(*args, **kwargs)

        def _s8_gemm(self, a, b, shape):
            assert a.dtype == b.dtype == torch.int8 and a.is_contiguous() and b.is_contiguous()
            assert (shape.groups, shape.m, shape.n, shape.k) == (*a.shape[:2], b.shape[1], a.shape[2])
            StandIn.calls += 1
            return (a.long() @ b.long().mT).int()

    return StandIn(kernel="mma")


@pytest.fixture
def gpu_backend(monkeypatch, emu):
    """A tvm backend whose GPU branch runs on CPU tensors: the emulated quantization kernels and
    the stand-in GEMM."""
    from fraccompile.targets.backend import TVMBackend

    monkeypatch.setattr(TVMBackend, "on_gpu", staticmethod(lambda t: True))
    # convs as im2col + the GEMM here (the implicit-GEMM conv kernels have their own tests)
    for name in [n for n in dir(TVMBackend) if n.startswith("_gpu_conv")]:
        monkeypatch.setattr(TVMBackend, name, lambda *args, **kwargs: None)
    backend = TVMBackend()
    backend._cuda = _stand_in_gemm()
    backend._cuda_quant = SimpleNamespace(launcher=lambda device: emu)
    return backend


def _values(shape, seed, nonneg=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.3
    return x.abs() if nonneg else x


# -- codes: the reference quantizer's, bit for bit -------------------------------------------------
def _grid_codes(q):
    """The grid's codes of device IntCodes (stored codes plus the offset), fp32."""
    return q.codes.float() + (q.offset if isinstance(q.offset, torch.Tensor) else float(q.offset))


@pytest.mark.parametrize(
    "case",
    ["signed act", "unsigned act", "sbm act", "channel weight", "sbm channel weight", "tensor weight"],
)
def test_device_codes_are_the_reference_codes(emu, case):
    from fraccompile.targets.backend.device_codes import device_codes

    scheme = "sbm" if case.startswith("sbm") else "symmetric"
    if case.endswith("act"):
        x = _values((3, 5, 37), 1, nonneg=case == "unsigned act")
        lo, hi = tensor_range(x)
        signed, per_row = None, False
    else:
        x = _values((7, 3, 3, 3), 2)
        per_row = case != "tensor weight"
        lo, hi = weight_range(x, per_row)
        signed = True
    qp = qparams_from_range(lo, hi, 6, scheme, signed)
    q = device_codes(x, emu, 6, scheme, signed, per_row=per_row)
    assert q.codes.dtype == torch.int8 and q.device_grid and q.signed
    assert torch.equal(_grid_codes(q), quantize_to_int(x, qp))
    assert torch.equal(q.scale, qp.scale) and torch.equal(
        q.dequantize(), torch.addcmul(qp.zero, _grid_codes(q), qp.scale)
    )
    # the offset: a host int where the host knows the signedness, else device data
    if case == "signed act":
        assert float(q.offset) == 0 and qp.qmin < 0
    if case == "unsigned act":
        assert float(q.offset) == 32 and qp.qmin == 0
    if case.endswith("weight") and scheme == "symmetric":
        assert q.offset == 0


def test_channels_last_stochastic_and_wide_codes(emu):
    """Gradients: the signed grid, stochastic rounding with either noise (the same draws as the
    reference's), a channels-last tensor, and 12-bit codes as int32."""
    from fraccompile.targets.backend.device_codes import device_codes

    x = _values((2, 4, 5, 3), 3).contiguous(memory_format=torch.channels_last)
    lo, hi = tensor_range(x)
    for bits, noise in [(8, "counter"), (8, "torch"), (12, "counter")]:
        for scheme in ("symmetric", "sbm"):
            qp = qparams_from_range(lo, hi, bits, scheme, True)
            torch.manual_seed(5)
            want = quantize_to_int(x, qp, stochastic=True, noise=noise)
            torch.manual_seed(5)
            q = device_codes(x, emu, bits, scheme, True, stochastic=True, noise=noise)
            assert q.codes.dtype == (torch.int32 if bits > 8 else torch.int8)
            assert q.codes.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(_grid_codes(q), want), (bits, noise, scheme)


@pytest.mark.parametrize("scheme", ["symmetric", "sbm"])
def test_per_sample_codes_are_quantize_rows(emu, scheme):
    """A routed site's samples at their own bits (one shared range): rounding to nearest (the
    activations, signedness from the data), and the gradient's counter noise with the reference's
    seed per precision present, a 12-bit group among them."""
    from fraccompile.ops.quantizers import quantize_rows
    from fraccompile.targets.backend.device_codes import device_row_codes, minmax_of

    x = _values((5, 4, 9), 4, nonneg=scheme == "symmetric")
    row_bits = torch.tensor([3, 12, 6, 12, 4])
    lo, hi = tensor_range(x)
    for stochastic in (False, True):
        signed = True if stochastic else None

        def grid(b, signed=signed):
            return qparams_from_range(lo, hi, b, scheme, signed)

        torch.manual_seed(9)
        want = quantize_rows(x, row_bits, grid, stochastic=stochastic, noise="counter")
        torch.manual_seed(9)
        q = device_row_codes(
            x, row_bits, emu, scheme, signed, minmax_of(lo, hi), widest=12, stochastic=stochastic
        )
        assert q.codes.dtype == torch.int32 and q.scale.shape == (5, 1, 1)
        assert torch.equal(q.dequantize(), want)
    # rounding to nearest into a padded GEMM operand (rows = samples · 4, K = 9): zeros around
    x8 = x[:, :, :8].contiguous()
    want = quantize_rows(x8, row_bits.clamp(max=8), lambda b: qparams_from_range(lo, hi, b, scheme))
    out = torch.full((24, 16), 77, dtype=torch.int8)
    q = device_row_codes(x8, row_bits.clamp(max=8), emu, scheme, None, minmax_of(lo, hi), widest=8, out=out)
    assert torch.equal(q.dequantize(), want) and q.operand.shape == (1, 24, 16)
    assert not out[20:].any() and not out[:, 8:].any()


# -- the GEMM's exact offset correction ------------------------------------------------------------
def test_gemm_offsets_are_exact():
    from fraccompile.targets.runtime.cuda_driver import offset_terms

    gemm = _stand_in_gemm()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (2, 7, 45), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (2, 5, 45), dtype=torch.int8, generator=gen)
    cases = [
        (torch.tensor([[128]]), None),
        (None, torch.tensor([[64]])),
        (torch.tensor([[0, 128, 8, 128, 0, 2, 128]]), torch.tensor([[128]])),  # per row of a
        (torch.tensor([[128], [0]]), torch.tensor([[1, 2, 3, 4, 128]])),  # per group / per row of b
    ]
    for oa, ob in cases:
        ta = a.long() + (0 if oa is None else oa.long().expand(2, 7).unsqueeze(-1))
        tb = b.long() + (0 if ob is None else ob.long().expand(2, 5).unsqueeze(-1))
        want = ta @ tb.mT
        got = gemm.gemm(a, b, oa, ob)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    # pre-padded operands: the kernel call alone, then the same corrections
    shape = gemm.padded_shape(2, 7, 5, 45)
    A = torch.zeros((2, shape.m, shape.k), dtype=torch.int8)
    B = torch.zeros((2, shape.n, shape.k), dtype=torch.int8)
    A[:, :7, :45], B[:, :5, :45] = a, b
    oa, ob = cases[2]
    got = gemm.gemm_padded(A, B, shape, 7, 5, 45, oa, ob)
    assert torch.equal(got.long(), gemm.gemm(a, b, oa, ob).long())
    assert torch.equal(offset_terms(a, b, None, None, torch.int64), torch.zeros(2, 7, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="padded"):
        gemm.gemm_padded(A[:, :8], B, shape, 7, 5, 45)


# -- a site and a step on the GPU branch -----------------------------------------------------------
class Net(torch.nn.Module):
    """A conv (unsigned input after its ReLU), a linear and a matmul site; the first conv's input
    is signed."""

    def __init__(self):
        super().__init__()
        self.a = C2(3, 8, 3, padding=1)
        self.b = C2(8, 8, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(8, 12)
        self.out = torch.nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
        h = self.fc(h)
        return self.out(h + (h.unsqueeze(2) @ h.unsqueeze(1)).mean(2))


def _step(model, x, y, cfg, backend=None, guard=contextlib.nullcontext, compile_on="reference"):
    """A training step's loss and gradients; ``backend``: the sites' backend (compiled on
    ``compile_on``: ``"tvm"`` fuses the ReLU epilogues into the sites)."""
    m = copy.deepcopy(model)
    fm = fraccompile.compile(m, x, FracConfig(backend=compile_on, full_precision=("out",), **cfg))
    if backend is not None:
        for op in fm.modules():
            if isinstance(op, FracOp):
                op.backend = backend
    torch.manual_seed(1)
    with guard():
        loss = F.cross_entropy(fm(x), y)
        loss.backward()
    return loss.detach(), [p.grad for p in m.parameters()]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(scheme="symmetric"),
        dict(scheme="sbm"),
        dict(scheme="symmetric", weight_scale="tensor", rounding_noise="torch"),
        dict(scheme="sbm", weight_scale="gemm", g=12),
    ],
)
def test_gpu_branch_step_matches_reference(gpu_backend, emu, cfg):
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    ref_loss, ref_grads = _step(model, x, y, cfg)
    before = len(emu.launched)
    loss, grads = _step(model, x, y, cfg, gpu_backend)
    assert rel(ref_loss, loss) < TOL
    for r, g in zip(ref_grads, grads):
        assert rel(r, g) < TOL
    kinds = {name.split("_")[2] for name, _ in emu.launched[before:]}
    assert kinds == {"range", "qparams", "quantize"}
    assert gpu_backend._cuda.padded == 1  # fc's forward: no copy of its operands


_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "unique")


class _HostRead(AssertionError):
    pass


@contextlib.contextmanager
def _no_host_reads():
    """Every Python-level read of a tensor's value on the host (``bool``, ``int``, ``float``,
    ``.item()``, ``.tolist()``) and the ops that sync on a GPU (``nonzero``, ``unique``) raise."""

    def refuse(*args, **kwargs):
        raise _HostRead("host read inside the step")

    with pytest.MonkeyPatch.context() as mp:
        for name in _READS:
            mp.setattr(torch.Tensor, name, refuse)
        for name in ("unique", "nonzero"):
            mp.setattr(torch, name, refuse)
        yield


@pytest.mark.parametrize(
    "cfg,compile_on",
    [
        (dict(scheme="symmetric"), "reference"),
        (dict(scheme="sbm"), "reference"),
        (dict(scheme="symmetric", weight_scale="tensor", rounding_noise="torch"), "tvm"),
        (dict(scheme="sbm", weight_scale="gemm", g=12), "tvm"),
    ],
)
def test_gpu_branch_step_reads_nothing_on_the_host(gpu_backend, cfg, compile_on):
    """A whole training step (forward, backward) of the conv + linear + matmul model on the GPU
    branch with every host read refused: it runs, and its loss is the reference's (compiled for
    tvm: the ReLUs fused into the sites' epilogues, recomputed in backward)."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    # warm the caches that copy host data to the device once (bit widths, the GEMM's tiles)
    _step(model, x, y, cfg, gpu_backend, compile_on=compile_on)
    loss, grads = _step(model, x, y, cfg, gpu_backend, guard=_no_host_reads, compile_on=compile_on)
    ref_loss, ref_grads = _step(model, x, y, cfg)
    assert rel(ref_loss, loss) < TOL
    for r, g in zip(ref_grads, grads):
        assert rel(r, g) < TOL
    # the guard does catch a host read
    with pytest.raises(_HostRead), _no_host_reads():
        bool(torch.ones(1) > 0)


def test_gpu_branch_fused_norm_step_reads_nothing_on_the_host(gpu_backend):
    """``recompute="norms"``: a conv's BatchNorm and ReLU fused into its site (the batch
    statistics kept, the GEMM recomputed in backward from the codes), on the GPU branch with
    every host read refused; the loss and gradients are the reference's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        C2(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(288, 5),
    )
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    cfg = dict(scheme="symmetric", recompute="norms")

    def step(backend, guard=contextlib.nullcontext):
        m = copy.deepcopy(model)
        on = "reference" if backend is None else "tvm"  # (tvm: the norm fused into the site)
        fm = fraccompile.compile(m, x, FracConfig(backend=on, full_precision=(), **cfg))
        if backend is not None:
            for op in fm.modules():
                if isinstance(op, FracOp):
                    op.backend = backend
            assert any(getattr(op, "epilogue_norm", None) is not None for op in fm.modules())
        torch.manual_seed(1)
        with guard():
            loss = F.cross_entropy(fm(x), y)
            loss.backward()
        return loss.detach(), [p.grad for p in m.parameters()]

    step(gpu_backend)  # warm the caches
    loss, grads = step(gpu_backend, _no_host_reads)
    ref_loss, ref_grads = step(None)
    assert rel(ref_loss, loss) < TOL
    for r, g in zip(ref_grads, grads):
        assert rel(r, g) < TOL


@contextlib.contextmanager
def _recorded_host_reads(log: list):
    """The host reads of :func:`_no_host_reads`, run as usual but each recorded in ``log`` as the
    name of the function of ``fraccompile`` that made it."""
    import sys

    def wrap(original):
        def read(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and "fraccompile" not in frame.f_code.co_filename:
                frame = frame.f_back
            log.append(frame.f_code.co_name if frame is not None else "?")
            return original(*args, **kwargs)

        return read

    with pytest.MonkeyPatch.context() as mp:
        for name in _READS:
            mp.setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name)))
        for name in ("unique", "nonzero"):
            mp.setattr(torch, name, wrap(getattr(torch, name)))
        yield


@pytest.mark.parametrize("scheme", ["symmetric", "sbm"])
@pytest.mark.parametrize(
    "module,shape", [(C2(4, 8, 3, padding=1), (5, 4, 6, 6)), (torch.nn.Linear(13, 9), (5, 3, 13))]
)
def test_gpu_branch_routed_site_reads_only_its_groups(gpu_backend, module, shape, scheme):
    """A DFQ-routed site's step on the GPU branch reads on the host only what docs/cuda.md lists:
    the precisions present in the gradient (its counter seeds, :func:`device_row_codes`) and the
    weight gradient's groups of samples (``_scale_groups``); the forward reads nothing."""
    torch.manual_seed(4)
    x = torch.randn(*shape).relu().requires_grad_()
    fm = fraccompile.compile(
        torch.nn.Sequential(copy.deepcopy(module)), x, FracConfig(scheme=scheme, full_precision=())
    )
    (op,) = [m for m in fm.modules() if isinstance(m, FracOp)]
    op.backend = gpu_backend
    d, _ = _gated(op, [0, 4, 2, 4, 1])
    op(x, d)  # warm the per-value caches
    forward, backward = [], []
    with _recorded_host_reads(forward):
        y = op(x, d)
    with _recorded_host_reads(backward):
        y.backward(torch.ones_like(y))
    assert forward == []
    assert set(backward) == {"device_row_codes", "_scale_groups"}, backward


@pytest.mark.parametrize("scheme", ["symmetric", "sbm"])
@pytest.mark.parametrize(
    "module,shape", [(C2(4, 8, 3, padding=1), (5, 4, 6, 6)), (torch.nn.Linear(13, 9), (5, 3, 13))]
)
def test_gpu_branch_routed_site_matches_reference(gpu_backend, module, shape, scheme):
    """A DFQ-routed site (per-sample a in 3..6 bits, g in 6..12: a 12-bit gradient group) on the
    GPU branch: output, input, weight, bias and gate gradients within the reference's tolerance."""
    from fraccompile.ops.backend import get_backend

    torch.manual_seed(4)
    x = torch.randn(*shape).relu()
    fm = fraccompile.compile(
        torch.nn.Sequential(copy.deepcopy(module)), x, FracConfig(scheme=scheme, full_precision=())
    )
    (op,) = [m for m in fm.modules() if isinstance(m, FracOp)]
    results = {}
    for name, backend in (("reference", get_backend("reference")), ("gpu", gpu_backend)):
        o = copy.deepcopy(op)
        o.backend = backend
        d, probs = _gated(o, [0, 4, 2, 4, 1])
        xl = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = o(xl, d)
        torch.manual_seed(7)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        results[name] = [y.detach(), xl.grad, o.weight.grad, probs.grad, o.bias.grad]
    errs = [rel(r, g) for r, g in zip(results["reference"], results["gpu"])]
    assert max(errs) < TOL, errs
    if isinstance(module, torch.nn.Linear):  # per-sample codes written into the padded operand
        assert gpu_backend._cuda.padded == 1


# -- the runtime's launch convention ---------------------------------------------------------------
def test_quant_runtime_launches_on_the_current_stream(monkeypatch, tmp_path):
    """Against a stand-in driver: the module is built once per device (cached on disk), and a
    launch passes tensors as device pointers and ints as C ints on torch's current stream."""
    from fraccompile.targets.kernels import cuda
    from fraccompile.targets.runtime import cuda_quant

    builds, calls = [], []

    def fake_compile(source, arch, fmt):
        builds.append((arch, fmt))
        assert "fraccompile_q_quantize_counter_rows_int8_kernel" in source
        return b"CUBIN"

    class FakeDriver:
        def __call__(self, name, *args):
            calls.append(name)
            if name == "cuLaunchKernel":
                fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra = args
                calls.append(((gx, gy, gz), (bx, by, bz), stream.value))
                ptr = ctypes.cast(params[0], ctypes.POINTER(ctypes.c_void_p))[0]
                value = ctypes.cast(params[1], ctypes.POINTER(ctypes.c_int))[0]
                calls.append((ptr, value))

    monkeypatch.setattr(cuda, "compile_source", fake_compile)
    monkeypatch.setattr(cuda_quant, "driver", lambda: FakeDriver())
    monkeypatch.setattr(cuda_quant, "_primary_context", lambda index: ctypes.c_void_p(1))
    monkeypatch.setattr(cuda_quant, "_current", lambda ctx: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: SimpleNamespace(cuda_stream=5))
    runtime = cuda_quant.CudaQuant(cache_dir=tmp_path)
    launch = runtime.launcher(torch.device("cuda", 0))
    assert runtime.launcher(torch.device("cuda", 0)) is launch and builds == [("sm_90", "cubin")]
    assert cuda_quant.kernel_path("sm_90", "cubin", tmp_path).read_bytes() == b"CUBIN"
    t = torch.zeros(4)
    launch("fraccompile_q_range_kernel", (3, 1, 1), (256, 1, 1), [t, 7])
    assert calls[-3:] == ["cuLaunchKernel", ((3, 1, 1), (256, 1, 1), 5), (t.data_ptr(), 7)]
    assert cuda_quant.CudaQuant(cache_dir=tmp_path).image("sm_90", "cubin") == b"CUBIN" and len(builds) == 1
    # an export without the quantization kernels, and no nvcc: the error says to export again

    def no_nvcc(*args):
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(cuda, "compile_source", no_nvcc)
    old_export = SimpleNamespace(quantize_image=lambda arch: None, directory="DIR")
    with pytest.raises(
        RuntimeError, match="not in the exported library in DIR .*nvcc not found.*export again"
    ):
        cuda_quant.CudaQuant(library=old_export, cache_dir=tmp_path / "empty").image("sm_90", "cubin")


# -- on a GPU --------------------------------------------------------------------------------------


@gpu
def test_gpu_device_codes_are_the_reference_codes():
    from fraccompile.targets.backend.device_codes import device_codes
    from fraccompile.targets.runtime.cuda_quant import CudaQuant

    launch = CudaQuant().launcher(torch.device("cuda", torch.cuda.current_device()))
    x = _values((37, 301), 1, nonneg=True)
    for scheme, signed, per_row in [
        ("symmetric", None, False),
        ("sbm", None, False),
        ("symmetric", True, True),
    ]:
        lo, hi = channel_range(x) if per_row else tensor_range(x)
        q = device_codes(x.cuda(), launch, 6, scheme, signed, per_row=per_row)
        want = quantize_to_int(x, qparams_from_range(lo, hi, 6, scheme, signed))
        assert torch.equal(_grid_codes(q).cpu(), want)


@gpu
@pytest.mark.parametrize("scheme", ["symmetric", "sbm"])
def test_gpu_step_matches_reference(scheme):
    """A step on the GPU (quantization kernels, the GEMM kernel) equals the reference backend's."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    out = {}
    for be in ("reference", "tvm"):
        m = copy.deepcopy(model)
        fm = fraccompile.compile(m, x, FracConfig(scheme=scheme, backend=be, full_precision=("out",))).cuda()
        torch.manual_seed(1)
        loss = F.cross_entropy(fm(x.cuda()), y.cuda())
        loss.backward()
        out[be] = (loss.detach().cpu(), [p.grad.cpu() for p in m.parameters()])
    assert rel(out["reference"][0], out["tvm"][0]) < 1e-4
    for r, g in zip(out["reference"][1], out["tvm"][1]):
        assert rel(r, g) < 1e-4


@gpu
@pytest.mark.parametrize("scheme", ["symmetric", "sbm"])
def test_gpu_step_has_no_host_syncs(scheme):
    """After a warm-up step, a training step of the conv + linear + matmul model on the GPU runs
    with torch's sync debug mode set to raise on any synchronizing CUDA call (``.item()``,
    ``nonzero``, a pageable host-to-device copy ...), which the CPU tests cannot see."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 6, 6).cuda(), torch.randint(0, 5, (4,)).cuda()
    fm = fraccompile.compile(
        model, x.cpu(), FracConfig(scheme=scheme, backend="tvm", full_precision=("out",))
    )
    fm = fm.cuda()

    def step():
        F.cross_entropy(fm(x), y).backward()

    step()  # builds and loads the kernels, fills the per-value caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
