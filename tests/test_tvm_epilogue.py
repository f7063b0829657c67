"""Epilogue fusion and recompute on the TVM backend: fused activations and BatchNorms bit-identical to the
unfused graph, what backward keeps, the recompute budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tvm_helpers import (
    C2,
    TOL,
    _compare,
    _MatMul,
    _site_roles,
    rel,
    routed_matmul_errors,
    site_calls,
)

import fraccompile
from fraccompile import FracConfig
from fraccompile.examples import transformer_lm
from fraccompile.ops.backend import get_backend
from fraccompile.ops.modules import FracOp
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


class _MLP(torch.nn.Module):
    """An activation in every form the pass fuses, one unfusable (its input has two users), and a
    shared module called twice."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(33, 48), torch.nn.Linear(48, 40)
        self.fc3, self.fc4 = torch.nn.Linear(40, 40), torch.nn.Linear(40, 40)
        self.act, self.shared = torch.nn.SiLU(), torch.nn.Linear(40, 40)
        self.head = torch.nn.Linear(40, 10)

    def forward(self, x):
        h = F.gelu(self.fc1(x), approximate="tanh")  # function
        h = self.fc2(h).relu()  # method
        h = self.act(self.fc3(h))  # module
        u = self.fc4(h)
        h = F.gelu(u) + u  # two users: not fused
        h = torch.relu(self.shared(torch.relu(self.shared(h))))  # shared: not fused
        return self.head(h)


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = C2(3, 16, 3, padding=1), C2(16, 24, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(24, 10)

    def forward(self, x):
        h = F.relu(self.c1(x), inplace=True)
        h = F.gelu(self.c2(h))
        return self.head(h.mean((2, 3)))


def _fused_run(model, x, **cfg):
    """Loss, gradients and the bytes autograd saved (distinct storages, parameters excluded) of
    one step."""
    m = copy.deepcopy(model)
    fm = fraccompile.compile(m, x, FracConfig(scheme="symmetric", backend="tvm", full_precision=(), **cfg))
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(fm(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    fused = {o.site: o.epilogue for o in fm.modules() if isinstance(o, FracOp) and o.epilogue}
    return loss.detach(), [p.grad for p in m.parameters()], sum(storages.values()), fused


@pytest.mark.parametrize(
    "model,shape,expected",
    [
        (_MLP(), (42, 33), {"fc1": ("gelu", "tanh"), "fc2": ("relu", ""), "fc3": ("silu", "")}),
        (_CNN(), (4, 3, 12, 12), {"c1": ("relu", ""), "c2": ("gelu", "none")}),
    ],
)
def test_epilogue_fusion_is_bit_identical_and_saves_no_fp32_activation(model, shape, expected):
    """The fused sites' backward recomputes the pre-activation from the int8 codes: loss and every
    gradient equal the unfused graph's exactly, and autograd keeps at least the fp32
    pre-activations' bytes less."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    loss, grads, saved, fused = _fused_run(model, x)
    loss0, grads0, saved0, fused0 = _fused_run(model, x, recompute="none")
    assert fused == expected and fused0 == {}
    assert torch.equal(loss, loss0)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads0))
    sizes = {}  # fp32 bytes of each fused site's output
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda mod, args, out, n=n: sizes.__setitem__(n, out.numel() * 4)
        )
        for n in expected
    ]
    model(x)
    for h in hooks:
        h.remove()
    assert saved0 - saved >= sum(sizes.values()), (saved0, saved, sizes)


@pytest.mark.parametrize(
    "layer,shape", [(torch.nn.Linear(33, 20), (2, 5, 33)), (C2(4, 20, 3, padding=1), (2, 4, 6, 6))]
)
def test_in_place_op_on_a_site_output(layer, shape):
    """A site's output is not a view of the kernel's buffer: ``ReLU(inplace=True)`` after it works
    (autograd refuses in-place ops on a custom Function's view outputs) and gives the gradients of
    the out-of-place ReLU."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    grads = []
    for inplace in (True, False):
        torch.manual_seed(2)
        m = torch.nn.Sequential(
            copy.deepcopy(layer), torch.nn.ReLU(inplace=inplace), torch.nn.Flatten(), torch.nn.LazyLinear(3)
        )
        m(x)
        fm = fraccompile.compile(
            m, x, FracConfig(scheme="symmetric", backend="tvm", full_precision=(), recompute="none")
        )
        torch.manual_seed(1)
        fm(x).square().sum().backward()
        grads.append(m[0].weight.grad)
    assert torch.equal(*grads)


class _BNBlock(torch.nn.Module):
    """conv -> BN -> ReLU (not fusable: BN in between), a residual ReLU, and an in-place ReLU
    whose input is read again afterwards (must stay in place)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = C2(3, 16, 3, padding=1), C2(16, 16, 3, padding=1)
        self.c3 = C2(16, 16, 3, padding=1)
        self.b1, self.b2 = torch.nn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
        self.act = torch.nn.ReLU(inplace=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        h = self.act(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)) + h)
        y = self.c3(h)
        h = F.relu(y, inplace=True) + y  # y is read after the in-place ReLU
        return self.head(h.mean((2, 3)))


def test_recompute_activations_keeps_relu_masks_not_outputs():
    from fraccompile.ops.functions import masked_relu

    torch.manual_seed(0)
    model, x = _BNBlock(), torch.randn(8, 3, 10, 10)
    fm = fraccompile.compile(
        copy.deepcopy(model), x, FracConfig(scheme="symmetric", backend="tvm", full_precision=())
    )
    masked = [n for n in fm.graph.nodes if n.target is masked_relu]
    assert len(masked) == 2
    hooked = copy.deepcopy(model)  # a module with a hook keeps its call, and the hook runs
    seen = []
    hooked.act.register_forward_hook(lambda *args: seen.append(1))
    fh = fraccompile.compile(
        hooked, x, FracConfig(scheme="symmetric", backend="tvm", full_precision=(), recompute="norms")
    )
    fh(x)
    assert seen and "BatchNorm2d+relu" not in {s.epilogue for s in fh.sites}
    loss, grads, saved, _ = _fused_run(model, x)
    loss0, grads0, saved0, _ = _fused_run(model, x, recompute="none")
    assert torch.equal(loss, loss0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))
    relu_out = 8 * 16 * 10 * 10 * 4
    assert saved0 - saved >= 2 * relu_out * 3 / 4, (saved0, saved)
    # the same values and gradients as torch's ReLU, NaN, infinities and signed zeros included
    t = torch.tensor([-1.0, -0.0, 0.0, 2.0, float("nan"), float("inf"), -float("inf")], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, 6.0, float("nan")])
    ours, ref = masked_relu(t), torch.relu(t)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    (d_ours,) = torch.autograd.grad(ours, t, g)
    (d_ref,) = torch.autograd.grad(ref, t, g)
    assert torch.equal(d_ours, d_ref)


@pytest.mark.parametrize("x_last,g_last", [(True, False), (False, True), (True, True)])
def test_masked_relu_gradient_in_either_layout(x_last, g_last):
    """Gradient and mask meet in the forward's layout (channels-last or not): the gradient equals
    torch's ReLU's in every combination and comes out laid out as the input was."""
    from fraccompile.ops.functions import masked_relu

    fmt = {True: torch.channels_last, False: torch.contiguous_format}
    torch.manual_seed(0)
    t = torch.randn(2, 5, 3, 4).contiguous(memory_format=fmt[x_last]).requires_grad_()
    g = torch.randn(2, 5, 3, 4).contiguous(memory_format=fmt[g_last])
    (ours,) = torch.autograd.grad(masked_relu(t), t, g)
    (ref,) = torch.autograd.grad(torch.relu(t), t, g)
    assert torch.equal(ours, ref) and ours.stride() == t.stride()


@pytest.mark.parametrize(
    "shape, x_last, g_last, dtype",
    [
        ((8, 16, 6, 6), True, True, torch.float32),
        ((8, 16, 6, 6), True, False, torch.float32),
        ((8, 16, 6, 6), False, False, torch.float32),
        ((3, 70000), False, False, torch.float32),
        ((2, 5, 3, 4), True, True, torch.float64),
    ],
)
def test_masked_relu_backward_runs_the_tvm_kernel(monkeypatch, shape, x_last, g_last, dtype):
    """Once the tvm backend exists, MaskedReLU's backward is its one-pass kernel wherever the
    gradient is an fp32 CPU tensor (brought to the mask's layout first), torch's route otherwise;
    the gradient equals torch's ReLU's bit for bit either way."""
    from fraccompile.ops import functions
    from fraccompile.ops.functions import masked_relu
    from fraccompile.targets.backend.tvm_backend import TVMBackend

    get_backend("tvm")  # a tvm backend exists: one of them (the last created) serves
    assert isinstance(getattr(functions._mask_grad, "__self__", None), TVMBackend)
    kinds = []
    kernel = TVMBackend.kernel

    def recording(self, ref):
        kinds.append(ref.kind)
        return kernel(self, ref)

    monkeypatch.setattr(TVMBackend, "kernel", recording)
    fmt = {True: torch.channels_last, False: torch.contiguous_format}
    torch.manual_seed(0)
    t = torch.randn(shape, dtype=dtype)
    g = torch.randn(shape, dtype=dtype)
    if len(shape) == 4:
        t, g = t.contiguous(memory_format=fmt[x_last]), g.contiguous(memory_format=fmt[g_last])
    row = (0,) * (len(shape) - 1)  # the first few entries of one row, in either layout
    t[row][:3] = torch.tensor([0.0, -0.0, float("nan")], dtype=dtype)
    g[row][:2] = torch.tensor([float("nan"), -0.0], dtype=dtype)
    t.requires_grad_()
    (ours,) = torch.autograd.grad(masked_relu(t), t, g)
    (ref,) = torch.autograd.grad(torch.relu(t), t, g)
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.nan_to_num(), ref.nan_to_num())
    assert torch.equal(torch.signbit(ours), torch.signbit(ref)) and ours.stride() == t.stride()
    assert kinds == (["mask_grad"] if dtype == torch.float32 else [])


class _NormNoAffine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = C2(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16, affine=False)
        self.c2, self.b2 = C2(16, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = F.gelu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))
        h = self.b2(h)  # a BatchNorm called twice: not fused
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(
    "model,fused_norms",
    [
        (_BNBlock(), {"c1": "BatchNorm2d+relu", "c2": "BatchNorm2d"}),
        (_NormNoAffine(), {"c1": "BatchNorm2d+gelu"}),
    ],
)
def test_recompute_norms_is_bit_identical_and_keeps_only_codes(model, fused_norms):
    """recompute="norms": a BatchNorm (and the activation after it) joins the conv site's epilogue.
    Two training steps give the same loss, gradients and running statistics as the unfused graph,
    bit for bit; eval mode gives the same output; the state_dict keys do not change; autograd
    keeps less."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10, 10)
    out = {}
    for recompute in (False, True):
        m = copy.deepcopy(model)
        level = "norms" if recompute else "activations"
        fm = fraccompile.compile(
            m, x, FracConfig(scheme="symmetric", backend="tvm", full_precision=(), recompute=level)
        )
        assert {id(p) for p in fm.parameters()} == {id(p) for p in m.parameters()}
        twin = copy.deepcopy(fm)  # a copy's sites call the copy's BatchNorm modules
        for op in (o for o in twin.modules() if isinstance(o, FracOp) and o.epilogue_norm):
            assert twin.get_submodule(op.epilogue_norm_path) is op.epilogue_norm
        torch.manual_seed(1)
        for _ in range(2):
            loss = F.cross_entropy(fm(x), torch.arange(8) % 10)
            loss.backward()
        fm.eval()
        out[recompute] = (
            loss.detach(),
            [p.grad for p in m.parameters()],
            [b.clone() for b in m.buffers()],
            fm(x).detach(),
            sorted(fm.state_dict()),
            {s.name: s.epilogue for s in fm.sites},
        )
    (loss0, g0, b0, e0, k0, _), (loss1, g1, b1, e1, k1, epi) = out[False], out[True]
    assert torch.equal(loss0, loss1) and torch.equal(e0, e1) and k0 == k1
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    assert {k: v for k, v in epi.items() if v and "Norm" in v} == fused_norms
    saved = _fused_run(model, x, recompute="norms")[2]
    saved0 = _fused_run(model, x)[2]
    assert saved0 - saved >= 8 * 16 * 10 * 10 * 4 * len(fused_norms) * 3 / 4


class _BudgetNet(torch.nn.Module):
    """Three conv -> BatchNorm -> ReLU sites, fp32 norm inputs per image: c1 1600 elements at a
    reduction of K = 27, c2 1600 at K = 144, c3 (stride 2) 800 at K = 144."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = C2(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2, self.b2 = C2(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c3, self.b3 = C2(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        h = F.relu(self.b3(self.c3(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(
    "budget,kept", [(0.0, set()), (0.1, set()), (0.3, {"c3"}), (0.6, {"c2", "c3"}), (1.0, {"c1", "c2", "c3"})]
)
def test_recompute_budget_keeps_the_costliest_norms_and_stays_bit_identical(budget, kept):
    """``recompute_budget``: of the norms' fp32 inputs (4000 elements per image) backward keeps
    at most that fraction, the longest reductions first (c2 and c3 before c1; at 0.3 c2's 1600
    do not fit in 1200, c3's 800 do). The kept norms are the unfused graph's, the rest fused:
    loss and gradients equal recompute="activations" bit for bit, and autograd keeps the kept
    norms' inputs (4 bytes each) more than with every norm fused."""
    torch.manual_seed(0)
    model, x = _BudgetNet(), torch.randn(4, 3, 10, 10)
    loss, grads, saved, _ = _fused_run(model, x, recompute="norms", recompute_budget=budget)
    loss0, grads0, _, _ = _fused_run(model, x)
    assert torch.equal(loss, loss0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))
    fm = fraccompile.compile(
        copy.deepcopy(model),
        x,
        FracConfig(
            scheme="symmetric", backend="tvm", full_precision=(), recompute="norms", recompute_budget=budget
        ),
    )
    epi = {s.name: s.epilogue for s in fm.sites}
    assert {n for n, e in epi.items() if "not fused" in e} == kept
    assert all(epi[n] == "BatchNorm2d+relu" for n in {"c1", "c2", "c3"} - kept)
    size = {"c1": 1600, "c2": 1600, "c3": 800}
    assert sum(size[n] for n in kept) <= budget * 4000
    saved_all = _fused_run(model, x, recompute="norms")[2]
    assert saved - saved_all >= 4 * 4 * sum(size[n] for n in kept) * 3 / 4


class _ActBudgetNet(torch.nn.Module):
    """Three linear -> activation sites. Bytes backward keeps per sample when unfused, and the
    recompute's MACs per such byte: fc1 + GELU 32 fp32 inputs (128 B) at K = 8 (2 per byte),
    fc2 + ReLU a 32-byte mask at K = 32 (32 per byte), fc3 + SiLU 16 fp32 inputs (64 B) at
    K = 32 (8 per byte); 224 B in all."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 32)
        self.fc3, self.head = torch.nn.Linear(32, 16), torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(F.silu(self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))))


@pytest.mark.parametrize(
    "budget,kept",
    [(0.1, set()), (0.2, {"fc2"}), (0.5, {"fc2", "fc3"}), (1.0, {"fc1", "fc2", "fc3"})],
)
def test_recompute_budget_keeps_the_costliest_activations_and_stays_bit_identical(budget, kept):
    """``recompute_budget`` with ``recompute="activations"``: the sites with the most MACs per
    byte kept stay unfused first while their bytes fit in that fraction of 224 (at 0.2 the ReLU's
    mask, 32 B of 44.8; at 0.5 also the SiLU's 64 B, the GELU's 128 B no longer fit in 112). Loss
    and gradients equal every activation fused, bit for bit; backward keeps the unfused ones'
    bytes on top."""
    torch.manual_seed(0)
    model, x = _ActBudgetNet(), torch.randn(16, 8)
    loss, grads, saved, fused = _fused_run(model, x, recompute_budget=budget)
    loss0, grads0, saved0, fused0 = _fused_run(model, x)
    assert torch.equal(loss, loss0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))
    assert set(fused0) == {"fc1", "fc2", "fc3"} and set(fused) == set(fused0) - kept
    fm = fraccompile.compile(
        copy.deepcopy(model),
        x,
        FracConfig(scheme="symmetric", backend="tvm", full_precision=(), recompute_budget=budget),
    )
    epi = {s.name: s.epilogue for s in fm.sites}
    names = {"fc1": "gelu", "fc2": "relu", "fc3": "silu"}
    assert all(epi[n] == f"{names[n]} not fused (recompute_budget {budget:g})" for n in kept)
    assert all(epi[n] == names[n] for n in set(names) - kept)
    size = {"fc1": 128, "fc2": 32, "fc3": 64}
    assert saved - saved0 >= 16 * sum(size[n] for n in kept) * 3 / 4, (saved, saved0)


@pytest.mark.parametrize("model,slow_calls", [(_BNBlock(), 0), (_NormNoAffine(), 1)])
def test_fused_batchnorm_backward_uses_saved_statistics(model, slow_calls, monkeypatch):
    """A fused BatchNorm followed by nothing or a ReLU keeps its batch statistics and the ReLU's
    1-byte mask, and backward calls ``native_batch_norm_backward`` on the recomputed GEMM output;
    other activations (GELU) recompute the norm under autograd (bit identity: the test above)."""
    from fraccompile.targets.backend import site_gemm as B

    calls, slow = [], B._norm_backward

    def counting(*args):
        calls.append(1)
        return slow(*args)

    monkeypatch.setattr(B, "_norm_backward", counting)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10, 10)
    fm = fraccompile.compile(
        copy.deepcopy(model),
        x,
        FracConfig(scheme="symmetric", backend="tvm", full_precision=(), recompute="norms"),
    )
    F.cross_entropy(fm(x), torch.arange(8) % 10).backward()
    assert len(calls) == slow_calls


def test_epilogue_fusion_needs_the_tvm_backend_and_follows_torch_export():
    torch.manual_seed(0)
    x = torch.randn(5, 33)
    model = torch.nn.Sequential(torch.nn.Linear(33, 20), torch.nn.GELU(), torch.nn.Linear(20, 4))
    ref = fraccompile.compile(
        copy.deepcopy(model), x, FracConfig(scheme="symmetric", backend="reference", full_precision=())
    )
    assert not [o for o in ref.modules() if isinstance(o, FracOp) and o.epilogue]
    exported = fraccompile.compile(
        copy.deepcopy(model),
        x,
        FracConfig(scheme="symmetric", backend="tvm", capture="export", full_precision=()),
    )
    fused = [o for o in exported.modules() if isinstance(o, FracOp) and o.epilogue]
    assert [o.epilogue for o in fused] == [("gelu", "none")]
    assert "epilogue=gelu" in repr(fused[0])
    # the fused site against the reference backend, roles and all (tolerance: fp32 sums)
    calls = []
    fused[0].register_forward_hook(lambda mod, args, out: calls.append(args))
    exported(x)
    _compare(fused[0], calls[0])


@pytest.mark.parametrize("g, tol", [(8, 1e-3), (16, 1e-5)])
def test_fused_gelu_sbm_sites_agree_within_a_gradient_code(g, tol):
    """A site with a fused GELU quantizes ``gelu'(z)·dy``, ``z`` recomputed from the codes; with
    zero points (``sbm``) the two backends' ``z`` differ by fp32 rounding, which moves a gradient
    value next to a stochastic-rounding boundary to the neighbouring code. So these sites agree
    within a few codes' share, which shrinks with the gradient's bits (measured on the Transformer:
    2.2e-4 at g = 8, 1.4e-5 at 12, 2.3e-6 at 16), not to 1e-5 at every width."""
    torch.manual_seed(0)
    model, x = transformer_lm.model(), torch.randint(0, 65, (4, 16))
    fm = fraccompile.compile(model, x, FracConfig(a=8, w=8, g=g, scheme="sbm", backend="tvm"))
    calls = site_calls(fm, x, keep=lambda op: bool(op.epilogue))
    assert [op.epilogue for op, _ in calls] == [("gelu", "none")] * 2
    for op, args in calls:
        (ref, _), (got, ran) = _site_roles(op, args, "reference"), _site_roles(op, args, "tvm")
        assert ran == "tvm"
        errs = [rel(r, t) for r, t in zip(ref, got)]
        assert errs[0] < TOL and max(errs) < tol, (op.site, errs)


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
@pytest.mark.parametrize("ys", [(5, 3, 16, 7), (16, 7)])
def test_routed_gate_matmul_roles_match_reference(scheme, ys):
    """Attention under a DFQ gate: per-sample scales on the matmul's batch axis (each batch
    entry's product scaled by its sample's, then summed over broadcast entries)."""
    torch.manual_seed(2)
    x, y = torch.randn(5, 3, 9, 16).relu(), torch.randn(*ys)
    fm = fraccompile.compile(_MatMul(torch.matmul), (x, y), FracConfig(scheme=scheme, full_precision=()))
    (op,) = [m for m in fm.modules() if isinstance(m, FracOp)]
    errs = routed_matmul_errors(op, x, y, [0, 4, 2, 4, 1])
    assert max(errs) < TOL, errs
