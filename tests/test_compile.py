"""compile(): exactness at full precision, site coverage, state_dict compatibility, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _layout_helpers import in_fp32_layout
from torch import nn

import fraccompile
from fraccompile import CaptureError, ConfigError, PassError, ShapeError
from fraccompile.examples import resnet_cifar
from fraccompile.ops import FracOp
from fraccompile.ops.backend import resolve_auto
from fraccompile.passes import PASSES, PIPELINES, get_pass, get_pipeline


def _loss(out):
    return out.float().pow(2).mean()


def test_full_precision_is_bit_identical(example):
    """All precisions 0: outputs and every parameter gradient equal the original's exactly, the
    original run in the compiled model's fp32 layout."""
    name, model, x, kwargs, _ = example
    model.train()
    fm = fraccompile.compile(copy.deepcopy(model), x, a=0, w=0, g=0, **kwargs)
    assert len(fm.precision) > 0
    model, x = in_fp32_layout(model, x, fm)
    torch.manual_seed(1)
    y_ref = model(x)
    _loss(y_ref).backward()
    torch.manual_seed(1)
    y = fm(x)
    _loss(y).backward()
    assert torch.equal(y, y_ref), name
    ref_params = dict(model.named_parameters())
    params = dict(fm.named_parameters())
    assert set(ref_params) <= set(params)
    for key, p in ref_params.items():
        assert p.grad is not None, key
        assert torch.equal(params[key].grad, p.grad), key


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_precision_zero_layout_follows_the_backend(backend):
    """On ``reference`` precision 0 is the original NCHW model bit for bit; where ``auto`` picks
    tvm the fp32 convs run channels-last, which changes fp32 rounding (so the promise names the
    layout)."""
    torch.manual_seed(0)
    model, x = resnet_cifar.resnet20(), torch.randn(2, 3, 32, 32)
    fm = fraccompile.compile(copy.deepcopy(model), x, a=0, w=0, g=0, backend=backend)
    on_tvm = backend == "auto" and resolve_auto() == "tvm"
    expected = torch.channels_last if on_tvm else torch.contiguous_format
    assert fm.fp32_memory_format == expected
    assert torch.equal(fm(x), model.to(memory_format=expected)(x.contiguous(memory_format=expected)))


def test_every_layer_becomes_a_site(example):
    name, model, x, kwargs, n_sites = example
    fm = fraccompile.compile(copy.deepcopy(model), x, **kwargs)
    quantized = [s for s in fm.sites if not s.full_precision]
    kept = [s for s in fm.sites if s.full_precision]
    assert len(quantized) == n_sites, name
    assert len(kept) == 2 if name not in ("transformer",) else len(kept) == 1
    assert sorted(fm.precision.sites) == sorted(s.name for s in quantized)
    # every site is a FracOp in the module tree and is fed by a precision-control node
    assert len([m for m in fm.modules() if isinstance(m, FracOp)]) == n_sites
    assert fm.code.count("self.frac_precision(") == sum(s.calls for s in quantized)


def test_quantized_training_step_runs_and_changes_output(example):
    """At a/w/g = 4/4/8 the output differs from the fp32 model's (quantization is on), is finite,
    and stays near it: relative error under 0.5 (0.01 to 0.41 on the examples; a quantizer that
    zeroes its input gives 1.0, NaN fails the finiteness check). Every gradient is finite."""
    name, model, x, kwargs, _ = example
    fm = fraccompile.compile(copy.deepcopy(model), x, a=4, w=4, g=8, **kwargs)
    torch.manual_seed(1)
    y = fm(x)
    _loss(y).backward()
    torch.manual_seed(1)
    y_ref = model(x)
    assert not torch.equal(y, y_ref), name
    assert torch.isfinite(y).all(), name
    rel = ((y - y_ref).float().norm() / y_ref.float().norm()).item()
    assert rel < 0.5, (name, rel)
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in fm.parameters() if p.requires_grad
    )


def test_state_dict_keys_match_original(example):
    name, model, x, kwargs, _ = example
    fm = fraccompile.compile(copy.deepcopy(model), x, **kwargs)
    ref = model.state_dict()
    sd = fm.state_dict()
    assert set(ref) <= set(sd)
    # the extra keys are the sites' running activation ranges only
    assert all(".act_range." in k or ".rhs_range." in k for k in set(sd) - set(ref))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    result = fm.load_state_dict(fresh.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(".act_range." in k or ".rhs_range." in k for k in result.missing_keys)
    for key, value in fresh.state_dict().items():
        assert torch.equal(fm.state_dict()[key], value), key


def test_parameters_are_shared_not_copied():
    from fraccompile.examples.resnet_cifar import resnet20

    model = resnet20()
    fm = fraccompile.compile(model, torch.randn(2, 3, 32, 32))
    ref = dict(model.named_parameters())
    for key, p in fm.named_parameters():
        if key in ref:
            assert p is ref[key], key
    # a module site keeps its path and owns the same Parameter objects
    site = fm.get_submodule("layer1.0.conv1")
    assert isinstance(site, FracOp) and site.weight is model.layer1[0].conv1.weight


def test_user_model_is_not_modified():
    from fraccompile.examples.resnet_cifar import resnet20

    model, x = resnet20(), torch.randn(4, 3, 32, 32)
    bn_before = model.bn1.running_mean.clone()
    rng_before = torch.random.get_rng_state()
    fraccompile.compile(model, x)
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)
    assert torch.equal(model.bn1.running_mean, bn_before), "shape propagation touched BN stats"
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_deepcopy_keeps_controller_and_config():
    from fraccompile.examples.resnet_cifar import resnet20

    fm = fraccompile.compile(resnet20(), torch.randn(2, 3, 32, 32), a=6)
    other = copy.deepcopy(fm)
    assert other.frac_config == fm.frac_config
    other.precision.set(a=3)
    assert fm.precision["layer1.0.conv1"].a == 6 and other.precision["layer1.0.conv1"].a == 3
    # the copy's graph reads the copy's controller
    assert other.get_submodule("frac_precision").controller is other.precision


def test_export_fallback_is_used_for_shape_control_flow():
    from fraccompile.examples.control_flow import ShapeAdaptiveNet

    fm = fraccompile.compile(ShapeAdaptiveNet(), torch.randn(2, 3, 64, 64))
    assert fm.meta["frac_capture"] == "export"
    assert {s.source for s in fm.sites} == {"aten"}
    assert [s.name for s in fm.sites] == ["down", "conv1", "conv2", "fc"]


def test_untraceable_model_error_names_module_and_line():
    from fraccompile.examples.control_flow import ValueBranchNet

    with pytest.raises(CaptureError) as info:
        fraccompile.compile(ValueBranchNet(), torch.randn(2, 3, 32, 32))
    msg = str(info.value)
    assert "gate" in msg and "ValueGate" in msg
    assert "control_flow.py:" in msg and "leaf_modules" in msg
    assert "\n" not in msg


def test_capture_fx_only_does_not_fall_back():
    from fraccompile.examples.control_flow import ShapeAdaptiveNet

    with pytest.raises(CaptureError, match="torch.fx"):
        fraccompile.compile(ShapeAdaptiveNet(), torch.randn(2, 3, 64, 64), capture="fx")


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_wrong_input_shape_is_a_shape_error(capture):
    from fraccompile.examples.resnet_cifar import resnet20

    with pytest.raises(ShapeError, match=r"\(2, 4, 32, 32\)"):
        fraccompile.compile(resnet20(), torch.randn(2, 4, 32, 32), capture=capture)


def test_fx_and_export_capture_agree():
    from fraccompile.examples.resnet_cifar import resnet20

    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    a = fraccompile.compile(copy.deepcopy(model), x, capture="fx")
    b = fraccompile.compile(copy.deepcopy(model), x, capture="export")
    assert [s.name for s in a.sites] == [s.name for s in b.sites]
    assert [s.macs for s in a.sites] == [s.macs for s in b.sites]
    torch.manual_seed(0)
    ya = a(x)
    torch.manual_seed(0)
    yb = b(x)
    assert torch.equal(ya, yb)


def test_full_precision_patterns():
    from fraccompile.examples.resnet_cifar import resnet20

    fm = fraccompile.compile(resnet20(), torch.randn(2, 3, 32, 32), full_precision=("layer3.*",))
    kept = {s.name for s in fm.sites if s.full_precision}
    assert kept == {s.name for s in fm.sites if s.name.startswith("layer3.")}
    assert "conv1" in fm.precision.sites and "fc" in fm.precision.sites


def test_ops_filter():
    from fraccompile.examples.transformer_lm import model

    fm = fraccompile.compile(model(), torch.zeros(2, 8, dtype=torch.long), ops=("matmul",), full_precision=())
    assert {s.kind for s in fm.sites} == {"matmul"} and len(fm.sites) == 4


def test_shared_module_called_twice_is_one_site():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.conv(self.conv(self.stem(x)).relu())
            return self.fc(x.mean((2, 3)))

    model, x = Twice(), torch.randn(2, 3, 8, 8)
    fm = fraccompile.compile(copy.deepcopy(model), x, a=0, w=0, g=0)
    (site,) = [s for s in fm.sites if not s.full_precision]
    assert site.name == "conv" and site.calls == 2
    assert site.macs == 2 * (2 * 8 * 8 * 8) * 8 * 9
    model, x = in_fp32_layout(model, x, fm)
    assert torch.equal(fm(x), model(x))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 4, padding="same", bias=False),
        nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2),
        nn.Conv3d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),
    ],
)
@pytest.mark.parametrize("noise", ["counter", "torch"])
@pytest.mark.parametrize("weight_scale", ["gemm", "channel"])
def test_conv_variants_match_reference_semantics(conv, noise, weight_scale):
    """Quantized site == conv(fake-quant x, fake-quant w); dx, dw from the stochastically
    quantized dy (same RNG) — checked against a hand-written reference. dx reads the weight as
    the error backprop quantizes it: per input channel (``"gemm"``, the default) or the forward's
    per-output-channel codes (``"channel"``)."""
    from fraccompile.ops.quantizers import (
        quantize_activation,
        quantize_gradient,
        quantize_weight,
        quantize_weight_for_backprop,
    )

    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(conv)]
    x = torch.randn(2, conv.in_channels, *([9] * dims), requires_grad=True)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Identity()
            self.conv = conv

        def forward(self, t):
            return self.conv(t)

    model = Wrap()
    fm = fraccompile.compile(
        copy.deepcopy(model),
        x.detach(),
        a=4,
        w=4,
        g=6,
        full_precision=(),
        rounding_noise=noise,
        weight_scale=weight_scale,
    )
    y = fm(x)
    dy = torch.randn_like(y)
    torch.manual_seed(3)
    y.backward(dy)
    dx, dw = x.grad.clone(), fm.conv.weight.grad.clone()

    xr = quantize_activation(x.detach(), 4, "sbm").requires_grad_()
    wr = quantize_weight(conv.weight.detach(), 4, "sbm").requires_grad_()
    yr = conv._conv_forward(xr, wr, conv.bias)
    torch.manual_seed(3)
    dyq = quantize_gradient(dy, 6, "sbm", noise=noise)
    yr.backward(dyq)
    w_eb = wr.detach()
    if weight_scale == "gemm":
        w_eb = quantize_weight_for_backprop(conv.weight.detach(), 4, "sbm", conv.groups)
        if conv.groups != conv.in_channels:  # (a depthwise conv's two grids are the same)
            assert not torch.equal(w_eb, wr.detach())
    xe = xr.detach().requires_grad_()
    conv._conv_forward(xe, w_eb, conv.bias).backward(dyq)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-5, atol=1e-5)


def test_linear_and_matmul_sites_match_reference_semantics():
    from fraccompile.ops.quantizers import quantize_activation, quantize_gradient

    class Attn(nn.Module):
        def forward(self, q, k):
            return (q @ k.transpose(-2, -1)).softmax(-1)

    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k = torch.randn(2, 1, 7, 8, requires_grad=True)  # broadcast over heads
    fm = fraccompile.compile(Attn(), (q.detach(), k.detach()), a=6, w=5, g=8)
    (site,) = fm.sites
    assert site.kind == "matmul" and site.macs == 2 * 3 * 5 * 7 * 8
    torch.manual_seed(0)
    out = fm(q, k)
    out.sum().backward()
    qr = quantize_activation(q.detach(), 6, "sbm").requires_grad_()
    kt = k.detach().transpose(-2, -1)
    kr = quantize_activation(kt, 5, "sbm").requires_grad_()
    s = qr @ kr
    ref = s.softmax(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad_s = torch.autograd.grad(ref.sum(), s)[0]
    torch.manual_seed(0)
    s.backward(quantize_gradient(grad_s, 8, "sbm"))
    torch.testing.assert_close(q.grad, qr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k.grad, kr.grad.transpose(-2, -1), rtol=1e-4, atol=1e-6)


def test_functional_sites_feed_gradients_to_the_original_parameters():
    from fraccompile.examples.functional_model import FunctionalNet

    model = FunctionalNet()
    fm = fraccompile.compile(model, torch.randn(2, 3, 32, 32), a=4, w=4, g=8)
    fm(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "frac_sites" in dict(fm.named_children())


def test_eval_mode_uses_running_range():
    from fraccompile.examples.resnet_cifar import resnet20

    fm = fraccompile.compile(resnet20(), torch.randn(4, 3, 32, 32), a=4, w=4, g=8)
    site = fm.get_submodule("layer1.0.conv1")
    assert not bool(site.act_range.initialized)
    fm(torch.randn(4, 3, 32, 32))
    assert bool(site.act_range.initialized)
    before = site.act_range.range.clone()
    fm.eval()
    with torch.no_grad():
        fm(10 * torch.randn(4, 3, 32, 32))
    assert torch.equal(site.act_range.range, before)  # eval does not update the range


def test_cost_matches_paper_formula():
    from fraccompile.examples.resnet_cifar import resnet20

    fm = fraccompile.compile(resnet20(), torch.randn(2, 3, 32, 32), a=4, w=6, g=8)
    cost = fm.cost()
    macs_q = sum(s.macs for s in fm.sites if not s.full_precision)
    macs_fp = sum(s.macs for s in fm.sites if s.full_precision)
    assert cost.fw == pytest.approx(macs_q * 4 * 6 / 1024 + macs_fp)
    assert cost.eb == pytest.approx(macs_q * 8 * 6 / 1024 + macs_fp)
    assert cost.gc == pytest.approx(macs_q * 4 * 8 / 1024 + macs_fp)
    assert cost.cp == pytest.approx(cost.total / (3 * (macs_q + macs_fp)))
    # a 3x3 conv on 16 channels at 32x32, batch 2
    layer = next(s for s in fm.sites if s.name == "layer1.0.conv1")
    assert layer.macs == 2 * 16 * 32 * 32 * 16 * 9
    fm.precision.set(a=0, w=0, g=0)
    assert fm.cost().cp == pytest.approx(1.0)


def test_unknown_pipeline_and_pass_list_valid_names():
    with pytest.raises(PassError, match="default"):
        get_pipeline("nope")
    with pytest.raises(PassError, match="quantize-insertion"):
        get_pass("nope")
    with pytest.raises(PassError, match="valid pipelines"):
        fraccompile.compile(nn.Linear(2, 2), torch.randn(1, 2), pipeline="nope")
    assert set(PIPELINES["default"]) <= set(PASSES)


def test_compile_rejects_bad_config():
    with pytest.raises(ConfigError, match="FracConfig.a"):
        fraccompile.compile(nn.Linear(2, 2), torch.randn(1, 2), a=99)
    with pytest.raises(ConfigError):
        fraccompile.compile(nn.Linear(2, 2), torch.randn(1, 2), config={"a": 4})
    with pytest.raises(ConfigError, match="unknown compile option"):
        fraccompile.compile(nn.Linear(2, 2), torch.randn(1, 2), nonsense=1)


def test_code_shows_precision_control_nodes():
    from fraccompile.examples.transformer_lm import model

    fm = fraccompile.compile(model(), torch.zeros(2, 8, dtype=torch.long))
    assert "prec_blocks_0_attn_matmul = self.frac_precision('blocks.0.attn.matmul')" in fm.code
    assert "self.frac_sites.blocks_0_attn_matmul(" in fm.code


def test_unused_parameters_keep_their_keys():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            return F.relu(self.fc(x))

    model = Unused()
    fm = fraccompile.compile(model, torch.randn(2, 4))
    assert set(model.state_dict()) <= set(fm.state_dict())
