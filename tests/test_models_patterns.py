"""Model patterns as people write them today (plain torch modules, no downloads): SDPA attention,
addmm / baddbmm / einsum, nn.MultiheadAttention, models without a site, opaque GEMMs (coverage),
train/eval behaviour on both capture paths, dynamic shapes on the export path, state_dict keys."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops.attention import AttentionSite, sdpa_reference

FP = dict(a=0, w=0, g=0, full_precision=())
Q8 = dict(a=8, w=8, g=8, full_precision=())


def _step(model, x):
    torch.manual_seed(1)
    out = model(*x) if isinstance(x, tuple) else model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    params = dict(model.named_parameters())
    zero = torch.zeros(())
    return out.detach(), [
        zero if params[k].grad is None else params[k].grad for k in sorted(params)
    ]  # by name: the compiled order differs


def _equal_at_precision_0(model, x, capture="auto"):
    ref_model = copy.deepcopy(model)
    fm = fraccompile.compile(model, x, FracConfig(capture=capture, **FP))
    ref, ref_grads = _step(ref_model, x)
    out, grads = _step(fm, x)
    assert torch.equal(ref, out)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, grads))
    return fm


class SDPA(nn.Module):
    def __init__(self, heads=4, kv_heads=4, mask=None, **kwargs):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 2 * 16 * kv_heads // heads)
        self.heads, self.kv_heads, self.mask, self.kwargs = heads, kv_heads, mask, kwargs
        self.o = nn.Linear(16, 16)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, **self.kwargs)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


_T = 6
SDPA_CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "bool_mask": {"mask": torch.ones(_T, _T, dtype=torch.bool).tril()},
    "float_mask": {"mask": torch.randn(_T, _T, generator=torch.Generator().manual_seed(0))},
    "gqa": {"kv_heads": 2, "enable_gqa": True},
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_sdpa_is_two_matmul_sites(case, capture):
    """Its QKᵀ and AV GEMMs are matmul sites; at precision 0 the fused op runs, bit-identical;
    quantized, the site's decomposition equals the reference math on the same quantized GEMMs."""
    torch.manual_seed(0)
    model, x = SDPA(**SDPA_CASES[case]), torch.randn(2, _T, 16)
    fm = _equal_at_precision_0(copy.deepcopy(model), x, capture)
    names = [s.name for s in fm.sites if s.op.startswith("sdpa")]
    assert names == ["sdpa.qk", "sdpa.av"]
    (site,) = [m for m in fm.modules() if isinstance(m, AttentionSite)]
    assert site.qk.spec.kind == site.av.spec.kind == "matmul"
    qk = next(s for s in fm.sites if s.name == "sdpa.qk")
    assert qk.macs == 2 * 4 * _T * _T * 4
    # the decomposition at full precision equals the fused op (to fp32 rounding)
    q, k, v = torch.randn(2, 4, _T, 4), torch.randn(2, 4, _T, 4), torch.randn(2, 4, _T, 4)
    mask = SDPA_CASES[case].get("mask")
    kw = {k_: v_ for k_, v_ in SDPA_CASES[case].items() if k_ not in ("mask", "kv_heads")}
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    mm = lambda a, b, p: a @ b  # noqa: E731
    got = sdpa_reference(
        mm, mm, q, k, v, mask, 0.0, kw.get("is_causal", False), kw.get("scale"), False, None, None
    )
    assert torch.allclose(ref, got, atol=1e-5)
    fm.precision.set(a=8, w=8, g=8)
    out, grads = _step(fm, x)
    ref_out = model(x)
    assert 0 < (out - ref_out).norm() / ref_out.norm() < 0.05
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_sdpa_dropout_follows_dropout_p():
    torch.manual_seed(0)
    model, x = SDPA(dropout_p=0.5), torch.randn(2, _T, 16)
    fm = fraccompile.compile(copy.deepcopy(model), x, FracConfig(**Q8))
    a, b = fm(x), fm(x)
    assert not torch.equal(a, b)  # dropout on the attention probabilities
    fm = fraccompile.compile(SDPA(), x, FracConfig(**Q8))
    assert torch.equal(fm(x), fm(x))  # without dropout_p the forward is deterministic


class Gemms(nn.Module):
    """HF GPT-2's Conv1D (addmm), a baddbmm, and one-GEMM einsums (weight and activations)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 24) * 0.1)
        self.bias = nn.Parameter(torch.randn(24) * 0.1)
        self.w2 = nn.Parameter(torch.randn(24, 16) * 0.1)

    def forward(self, x):
        B, T, C = x.shape
        h = torch.addmm(self.bias, x.reshape(-1, C), self.weight).view(B, T, 24)
        h = torch.einsum("btd,de->bte", h, self.w2)
        s = torch.einsum("bqd,bkd->bqk", h, x)
        h = torch.baddbmm(h, s.softmax(-1), x, beta=0.5, alpha=2.0)
        return torch.einsum("bij,bkj->bj", h, x)  # sums i and k apart: not one GEMM, fp32


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_addmm_baddbmm_einsum_sites(capture):
    torch.manual_seed(0)
    model, x = Gemms(), torch.randn(2, 5, 16)
    fm = _equal_at_precision_0(copy.deepcopy(model), x, capture)
    ops = {s.name: (s.kind, s.op) for s in fm.sites}
    assert ops["addmm"] == ("linear", "addmm")
    assert ops["baddbmm"][0] == "matmul"
    assert [k for k, op in ops.values() if op.startswith("einsum")] == ["matmul", "matmul"]
    (left,) = fm.fp32_ops
    assert left.op == "einsum" and "not one batched GEMM" in left.reason
    fm.precision.set(a=8, w=8, g=8)
    out, grads = _step(fm, x)
    ref = model(x)
    assert 0 < (out - ref).norm() / ref.norm() < 0.1
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("op", ["addmm", "einsum", "baddbmm"])
def test_sites_alone_are_exact(op):
    class One(Gemms):
        def forward(self, x):
            B, T, C = x.shape
            x = x * self.w2[0]
            if op == "addmm":
                return torch.addmm(self.bias, x.reshape(-1, C), self.weight)
            if op == "einsum":
                return torch.einsum("btd,bsd->bts", x, x) + torch.einsum("btd,de->bte", x, self.weight).sum()
            return torch.baddbmm(x, torch.einsum("btd,bsd->bts", x, x).softmax(-1), x, beta=0.5, alpha=2.0)

    torch.manual_seed(0)
    for capture in ("fx", "export"):
        fm = _equal_at_precision_0(One(), torch.randn(2, 5, 16), capture)
        assert fm.sites and not fm.fp32_ops


def test_addmm_site_quantizes_like_a_linear_site():
    """addmm(b, x, W) at 8 bits equals F.linear(x, Wᵀ, b) at 8 bits: same quantized weight
    (per output channel = per column of W) and activations."""
    torch.manual_seed(0)
    w, b, x = torch.randn(16, 24), torch.randn(24), torch.randn(10, 16)

    class A(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear
            self.weight = nn.Parameter(w.clone() if not linear else w.t().contiguous())
            self.bias = nn.Parameter(b.clone())

        def forward(self, x):
            if self.linear:
                return F.linear(x, self.weight, self.bias)
            return torch.addmm(self.bias, x, self.weight)

    outs = []
    for linear in (False, True):
        fm = fraccompile.compile(A(linear), x, FracConfig(**Q8))
        torch.manual_seed(3)
        outs.append(fm(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


class MHA(nn.Module):
    def __init__(self, batch_first=True, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(16, 3)

    def forward(self, x, kv, kpm):
        y, w = self.attn(x, kv, kv, key_padding_mask=kpm)
        return self.head(y) + w.sum()


@pytest.mark.parametrize("batch_first,kdim", [(True, None), (False, None), (True, 8)])
def test_multihead_attention_becomes_sites(batch_first, kdim):
    torch.manual_seed(0)
    model = MHA(batch_first, kdim)
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(*x.shape[:2], kdim or 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, -2:] = True
    fm = _equal_at_precision_0(copy.deepcopy(model), (x, kv, kpm), "fx")
    assert [s.name for s in fm.sites if s.name.startswith("attn")] == [
        f"attn.{p}" for p in ("q", "k", "v", "qk", "av", "out")
    ]
    assert set(fm.state_dict()) == set(model.state_dict()) | {
        k for k in fm.state_dict() if ".act_range." in k or ".rhs_range." in k
    }
    # the rewrite at full precision equals the module (to fp32 rounding): its semantics
    site = fm.get_submodule("frac_sites.attn")
    got = site(x, kv, kv, kpm, True, None, True, False, *[(0, 0, 1)] * 6)
    ref = model.attn(x, kv, kv, key_padding_mask=kpm)
    assert torch.allclose(got[0], ref[0], atol=1e-5) and torch.allclose(got[1], ref[1], atol=1e-6)
    fm.eval()
    assert not fm.get_submodule("attn").training  # train()/eval() reach the kept module


class NoSite(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.deconv = nn.ConvTranspose1d(8, 8, 3)
        self.register_buffer("pos", torch.arange(8), persistent=False)

    def forward(self, x):
        return self.deconv(self.norm(x + self.pos).transpose(1, 2))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_model_without_a_site_compiles_and_warns(capture):
    model, x = NoSite(), torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match="no quantized site"):
        fm = fraccompile.compile(copy.deepcopy(model), x, FracConfig(capture=capture))
    assert fm.sites == [] and fm.precision.sites == () or list(fm.precision.sites) == []
    assert fm.cost().total == 0
    assert torch.equal(fm(x), model(x))
    (left,) = fm.fp32_ops
    assert "transposed convolution" in left.reason
    assert set(fm.state_dict()) == set(model.state_dict())  # the buffer stays non-persistent


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > -1e9 else x  # value-dependent: needs to be a leaf


@torch.fx.wrap
def _wrapped_proj(x, w):
    if x.shape[0] > 1:  # Python control flow on a shape: its body does not trace with fx
        x = x * 2
    return F.linear(x, w).relu()


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.leaf, self.w = Leaf(), nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(_wrapped_proj(self.leaf(x), self.w))


def test_coverage_lists_gemms_inside_opaque_calls():
    model, x = Opaque(), torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fraccompile.compile(model, x, FracConfig(leaf_modules=("Leaf",)))
    reasons = {r.op: r.reason for r in fm.fp32_ops}
    assert "leaf module 'leaf' (Leaf): linear" in reasons["Leaf"]
    assert "'_wrapped_proj'" in reasons["_wrapped_proj"] and "linear" in reasons["_wrapped_proj"]
    assert "not traced through" in reasons["_wrapped_proj"]
    assert "full precision" in reasons["linear"]  # fc: @last_linear
    from fraccompile.report import coverage_markdown

    table = coverage_markdown(fm)
    assert table.count("\n- ") == len(fm.fp32_ops) - 1 and "inside leaf module" in table


@torch.fx.wrap
def _wrapped_attention(x, w, b, heads):
    """torchvision Swin's pattern: a wrapped function holding projections and attention GEMMs."""
    B, T, C = x.shape
    q = F.linear(x, w, b).view(B, T, heads, C // heads).transpose(1, 2)
    k = x.view(B, T, heads, C // heads).transpose(1, 2)
    attn = torch.matmul(q, k.transpose(-2, -1)).softmax(-1)
    return torch.matmul(attn, k).transpose(1, 2).reshape(B, T, C), attn


class WrappedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w, self.b = nn.Parameter(torch.randn(8, 8) / 3), nn.Parameter(torch.randn(8))
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        y, _ = _wrapped_attention(self.fc(x), self.w, self.b, 2)
        return self.out(F.dropout(y, 0.3, training=self.training))


def test_wrapped_function_is_traced_through():
    """A torch.fx.wrap'd function holding F.linear and torch.matmul: its GEMMs become sites
    (nothing left in fp32); precision 0 is bit-identical (values, gradients, eval); quantized, its
    sites run quantized."""
    torch.manual_seed(0)
    model, x = WrappedAttention(), torch.randn(2, 5, 8)
    fm = _equal_at_precision_0(copy.deepcopy(model), x, "fx")
    assert [s.kind for s in fm.sites] == ["linear", "linear", "matmul", "matmul", "linear"]
    assert fm.fp32_ops == [] and "_wrapped_attention" not in fm.code
    model.eval()
    fm.eval()
    assert torch.equal(fm(x), model(x))
    fm.precision.set(a=4, w=4, g=8)
    assert not torch.allclose(fm(x), model(x), atol=1e-3)


class DropPath(nn.Module):
    """timm's pattern: the branch on self.training changes the graph."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        h = F.dropout(h, 0.5, training=self.training)
        h = h + self.drop_path(self.fc1(h))
        return self.fc3(self.fc2(h))


def test_eval_mode_fx_switches_dropout_stochastic_depth_and_bn():
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 3, 6, 6)
    fm = fraccompile.compile(copy.deepcopy(model), x, FracConfig(**FP))
    assert fm.meta["frac_capture"] == "fx"
    fm.eval()
    model.eval()
    assert torch.equal(fm(x), model(x)) and torch.equal(fm(x), fm(x))
    fm.train()
    assert not torch.equal(fm(x), fm(x))  # dropout is back


def test_eval_mode_export_switches_dropout_and_bn():
    """The export path: BatchNorm's batch statistics / running-stat update and dropout follow
    train()/eval(); precision 0 in eval equals the original in eval, bit for bit."""
    torch.manual_seed(0)
    model = Block()
    model.drop_path.p = 0.0
    x = torch.randn(4, 3, 6, 6)
    fm = fraccompile.compile(copy.deepcopy(model), x, FracConfig(capture="export", **FP))
    ref = copy.deepcopy(model)
    torch.manual_seed(2)
    fm(x)
    torch.manual_seed(2)
    ref(x)
    assert torch.equal(fm.get_buffer("bn.running_mean"), ref.bn.running_mean)
    assert int(fm.get_buffer("bn.num_batches_tracked")) == 1
    fm.eval()
    ref.eval()
    assert torch.equal(fm(x), ref(x)) and torch.equal(fm(x), fm(x))
    assert int(fm.get_buffer("bn.num_batches_tracked")) == 1  # eval does not count batches


class TrainOnlyBranch(nn.Module):
    """HF attention's pattern on the export path: ``if self.training`` around different ops, so
    the eval-mode graph differs from the train-mode one in structure, not in constants."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(self.fc(x))
        h = F.dropout(h, 0.5) * 0.5 if self.training else h.tanh()
        return self.out(h)


def test_eval_mode_export_runs_the_graph_captured_in_eval_mode():
    torch.manual_seed(0)
    model, x = TrainOnlyBranch(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "runs the train-mode graph" warning
        fm = fraccompile.compile(copy.deepcopy(model), x, FracConfig(capture="export", **FP))
    assert fm.meta["frac_eval_modules"] and "frac_mode_merge" not in fm.meta
    ref = copy.deepcopy(model)
    torch.manual_seed(3)
    out, grads = _step(fm, x)
    torch.manual_seed(3)
    ref_out, ref_grads = _step(ref, x)
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    fm.eval()
    ref.eval()  # the running statistics trained above are the ones eval reads
    other = torch.randn(7, 8)  # another batch size: the eval graph is dynamic too
    assert torch.equal(fm(x), ref(x)) and torch.equal(fm(other), ref(other))
    copied = copy.deepcopy(fm)
    assert torch.equal(copied(x), ref(x))
    fm.precision.set(a=4, w=4, g=8)  # one controller and one set of sites for both graphs
    assert not torch.equal(fm(x), ref(x)) and torch.equal(copied(x), ref(x))
    fm.train()
    assert not torch.equal(fm(x), fm(x))  # dropout is back
    assert set(fm.state_dict()) - set(model.state_dict()) == {
        k for k in fm.state_dict() if ".act_range." in k
    }


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)
        self.pos = nn.Embedding(32, 16)
        self.attn = SDPA(is_causal=True)
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        T = ids.shape[1]
        if T > 32:  # data-dependent on a shape: fx fails, export captures it
            raise ValueError("too long")
        h = self.emb(ids) + self.pos(self.position_ids[:, :T])
        return self.head(self.attn(h))


def test_export_captures_batch_and_sequence_as_dynamic():
    torch.manual_seed(0)
    model, ids = TokenModel(), torch.randint(0, 50, (2, 8))
    fm = fraccompile.compile(copy.deepcopy(model), ids, FracConfig(**FP))
    assert fm.meta["frac_capture"] == "export"
    assert fm.meta["frac_static_dims"] == []
    for shape in [(3, 8), (2, 12), (1, 5)]:
        other = torch.randint(0, 50, shape)
        assert torch.equal(fm(other), model(other))
    extra = {k for k in fm.state_dict() if ".act_range." in k or ".rhs_range." in k}
    assert set(fm.state_dict()) == set(model.state_dict()) | extra  # position_ids: not persistent
    fm.precision.set(a=8, w=8, g=8)
    assert fm(torch.randint(0, 50, (3, 10))).shape == (3, 10, 50)


class Static(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        if x.shape[1] > 2:
            x = x * 2
        return self.fc(x.reshape(2, -1))  # the batch size is baked into the model


def test_static_only_model_says_which_dimension():
    fm = fraccompile.compile(Static(), torch.randn(2, 4, 4), FracConfig(**FP))
    (line,) = fm.meta["frac_static_dims"]
    assert "batch dimension 0 is static" in line and "size 2" in line
