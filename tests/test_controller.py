"""PrecisionController: setting precisions globally, by pattern and per site, its state, and (through
``fraccompile.compile`` on ResNet-20) that precision is data read at run time, not compiled in."""

from __future__ import annotations

import copy

import pytest
import torch
from _layout_helpers import in_fp32_layout

import fraccompile
from fraccompile import ConfigError, Precision, PrecisionController
from fraccompile.examples.resnet_cifar import resnet20

SITES = ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.shortcut.0", "fc1", "attn.matmul"]


@pytest.fixture
def ctrl():
    return PrecisionController(SITES)


def test_default_precision_and_views(ctrl):
    assert ctrl.sites == SITES and list(ctrl) == SITES and len(ctrl) == len(SITES)
    assert all(ctrl[s] == Precision(8, 8, 8) for s in SITES)
    assert dict(ctrl.items()) == {s: Precision(8, 8, 8) for s in SITES}
    assert "6 sites" in repr(ctrl)
    other = PrecisionController(SITES, default=Precision(4, 4, 0))
    assert other["fc1"] == Precision(4, 4, 0) and isinstance(other["fc1"], Precision)


def test_global_set(ctrl):
    changed = ctrl.set(a=4, w=4, g=8)
    assert changed == SITES
    assert all(ctrl[s] == Precision(4, 4, 8) for s in SITES)
    ctrl.set(g=6)  # fields left None keep their value
    assert all(ctrl[s] == Precision(4, 4, 6) for s in SITES)
    ctrl.set(a=0, w=0, g=0)
    assert all(ctrl[s].is_full for s in SITES)
    assert ctrl.set() == SITES and all(ctrl[s].is_full for s in SITES)  # no fields: a no-op


def test_pattern_set(ctrl):
    changed = ctrl.set("layer1.*", a=6)
    assert changed == ["layer1.0.conv1", "layer1.0.conv2"]
    assert ctrl["layer1.0.conv1"] == Precision(6, 8, 8) and ctrl["layer2.0.conv1"] == Precision(8, 8, 8)
    assert ctrl.set("*conv1", w=3) == ["layer1.0.conv1", "layer2.0.conv1"]
    assert ctrl["layer1.0.conv1"] == Precision(6, 3, 8)
    assert ctrl.set("layer2.0.shortcut.?", g=5) == ["layer2.0.shortcut.0"]
    assert ctrl.set("layer[12].0.conv2", a=2) == ["layer1.0.conv2"]
    # an exact name matches itself (even though '.' and '[' are not special here)
    assert ctrl.set("attn.matmul", a=4) == ["attn.matmul"]
    assert ctrl.match("fc1") == ["fc1"] and ctrl.match("*") == SITES
    # fnmatchcase: case-sensitive
    assert ctrl.match("LAYER1.*") == []


def test_set_site(ctrl):
    ctrl.set_site("fc1", (2, 3, 4))
    assert ctrl["fc1"] == Precision(2, 3, 4) and isinstance(ctrl["fc1"], Precision)
    ctrl.set_site("fc1", Precision(0, 16, 0))
    assert ctrl["fc1"] == Precision(0, 16, 0)
    assert all(ctrl[s] == Precision(8, 8, 8) for s in SITES if s != "fc1")


def test_unknown_site_lists_the_sites(ctrl):
    with pytest.raises(ConfigError, match="nope") as info:
        ctrl.set_site("nope", (4, 4, 4))
    assert all(s in str(info.value) for s in SITES)
    with pytest.raises(KeyError, match="nope") as info:
        ctrl["nope"]
    assert all(s in str(info.value) for s in SITES)


def test_non_matching_pattern_raises_with_the_sites(ctrl):
    before = dict(ctrl.items())
    with pytest.raises(ConfigError, match=r"layer9\.\*") as info:
        ctrl.set("layer9.*", a=4)
    assert all(s in str(info.value) for s in SITES)
    assert dict(ctrl.items()) == before


@pytest.mark.parametrize("bad", [1, 17, -1, 99, True, 4.0, "4"])
@pytest.mark.parametrize("field", ["a", "w", "g"])
def test_invalid_bits_raise_and_change_nothing(ctrl, field, bad):
    before = dict(ctrl.items())
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        ctrl.set(**{field: bad})
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        ctrl.set("layer1.*", **{field: bad})
    prec = dict(a=4, w=4, g=4)
    prec[field] = bad
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        ctrl.set_site("fc1", (prec["a"], prec["w"], prec["g"]))
    assert dict(ctrl.items()) == before


def test_state_dict_round_trip(ctrl):
    ctrl.set(a=4, w=4, g=8)
    ctrl.set("layer1.*", a=6)
    ctrl.set_site("fc1", (0, 0, 0))
    state = ctrl.state_dict()
    fresh = PrecisionController(SITES)
    fresh.load_state_dict(state)
    assert dict(fresh.items()) == dict(ctrl.items())
    assert all(isinstance(p, Precision) for _, p in fresh.items())
    # the state is a snapshot: later changes to either side do not leak
    state["sites"]["fc1"][0] = 8
    ctrl.set(g=2)
    assert fresh["fc1"] == Precision(0, 0, 0) and fresh["layer1.0.conv1"] == Precision(6, 4, 8)


def test_state_dict_survives_torch_save(ctrl, tmp_path):
    ctrl.set("layer2.*", a=3, w=5, g=7)
    torch.save(ctrl.state_dict(), tmp_path / "prec.pt")
    fresh = PrecisionController(SITES)
    fresh.load_state_dict(torch.load(tmp_path / "prec.pt", weights_only=True))
    assert dict(fresh.items()) == dict(ctrl.items())


def test_load_of_mismatched_state_raises(ctrl):
    state = ctrl.state_dict()
    missing = {"version": state["version"], "sites": dict(list(state["sites"].items())[1:])}
    with pytest.raises(ConfigError, match="missing") as info:
        ctrl.load_state_dict(missing)
    assert SITES[0] in str(info.value)
    extra = {"version": state["version"], "sites": state["sites"] | {"bogus.conv": [4, 4, 4]}}
    with pytest.raises(ConfigError, match="bogus.conv"):
        ctrl.load_state_dict(extra)
    other = PrecisionController(["x", "y"])
    with pytest.raises(ConfigError):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="version"):
        ctrl.load_state_dict({"version": 99, "sites": state["sites"]})
    with pytest.raises(ConfigError, match="version"):
        ctrl.load_state_dict({"sites": state["sites"]})


def test_load_of_invalid_bits_raises(ctrl):
    state = ctrl.state_dict()
    state["sites"]["fc1"] = [4, 1, 4]
    with pytest.raises(ConfigError):
        ctrl.load_state_dict(state)


def test_failed_load_leaves_the_controller_unchanged(ctrl):
    state = PrecisionController(SITES, default=Precision(4, 4, 4)).state_dict()
    state["sites"][SITES[-1]] = [4, 4, 99]
    before = dict(ctrl.items())
    with pytest.raises(ConfigError):
        ctrl.load_state_dict(state)
    assert dict(ctrl.items()) == before


# -- through fraccompile.compile -------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = resnet20()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fm = fraccompile.compile(copy.deepcopy(model), x)
    model, x = in_fp32_layout(model, x, fm)
    return model, fm, x


def _outputs(model, x):
    """The forward output, leaving buffers (BN statistics, running activation ranges) untouched so
    that train-mode calls do not make the original and the compiled model drift apart."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for b, v in saved:
            b.copy_(v)


def test_compiled_controller_lists_the_sites(resnet):
    _, fm, _ = resnet
    ctrl = fm.precision
    assert isinstance(ctrl, PrecisionController)
    names = [s.name for s in fm.sites if not s.full_precision]
    assert ctrl.sites == names and len(ctrl) == 20
    assert "conv1" not in ctrl.sites and "fc" not in ctrl.sites  # first conv / last linear stay fp32
    assert all(ctrl[s] == Precision(8, 8, 8) for s in ctrl)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_precision_changes_output_without_recompiling(resnet, mode):
    model, fm, x = resnet
    model.train(mode == "train")
    fm.train(mode == "train")
    code, graph, gm_id = fm.code, str(fm.graph), id(fm.graph)
    try:
        ref = _outputs(model, x)
        fm.precision.set(a=0, w=0, g=0)
        assert torch.equal(_outputs(fm, x), ref), "precision 0 must be bit-identical to the original"
        fm.precision.set(a=4, w=4, g=8)
        low = _outputs(fm, x)
        assert not torch.equal(low, ref)
        assert torch.isfinite(low).all()
        fm.precision.set(a=8, w=8, g=8)
        high = _outputs(fm, x)
        # 8 bits is closer to fp32 than 4 bits
        assert (high - ref).abs().max() < (low - ref).abs().max()
        fm.precision.set("layer3.*", a=2, w=2)
        assert not torch.equal(_outputs(fm, x), high)
        fm.precision.set(a=0, w=0, g=0)
        assert torch.equal(_outputs(fm, x), ref)
        # nothing was recompiled: same graph object, same code
        assert fm.code == code and str(fm.graph) == graph and id(fm.graph) == gm_id
        # fm.sites reflects the controller
        fm.precision.set("layer1.0.conv1", a=5, w=6, g=7)
        site = {s.name: s for s in fm.sites}["layer1.0.conv1"]
        assert site.precision == Precision(5, 6, 7)
    finally:
        fm.precision.set(a=8, w=8, g=8)
        model.train()
        fm.train()


def test_precision_zero_gradients_equal_the_original(resnet):
    model, fm, x = resnet
    model.train()
    fm.train()
    fm.precision.set(a=0, w=0, g=0)
    saved = [(b, b.detach().clone()) for m in (model, fm) for b in m.buffers()]
    try:
        for m in (model, fm):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        grads = dict(model.named_parameters())
        fgrads = dict(fm.named_parameters())
        for name, p in grads.items():
            assert name in fgrads, name
            assert torch.equal(fgrads[name].grad, p.grad), name
        # and at low precision the gradients differ
        fm.zero_grad(set_to_none=True)
        fm.precision.set(a=4, w=4, g=4)
        fm(x).square().mean().backward()
        assert any(not torch.equal(fgrads[n].grad, p.grad) for n, p in grads.items())
    finally:
        fm.precision.set(a=8, w=8, g=8)
        model.zero_grad(set_to_none=True)
        fm.zero_grad(set_to_none=True)
        for b, v in saved:
            b.copy_(v)


def test_compiled_state_dict_round_trip(resnet):
    model, fm, x = resnet
    fm.eval()
    try:
        fm.precision.set(a=4, w=4, g=8)
        fm.precision.set("layer2.*", a=6, w=5)
        fm.precision.set_site("layer3.2.conv2", (0, 0, 0))
        state = fm.precision.state_dict()
        out = _outputs(fm, x)
        # a second compile of the same weights, loaded with the state, computes the same thing
        fm2 = fraccompile.compile(copy.deepcopy(model), x)
        fm2.load_state_dict(fm.state_dict())
        fm2.eval()
        assert dict(fm2.precision.items()) != dict(fm.precision.items())
        fm2.precision.load_state_dict(state)
        assert dict(fm2.precision.items()) == dict(fm.precision.items())
        assert fm2.precision.state_dict() == state
        assert torch.equal(_outputs(fm2, x), out)
        # a state from another model does not load
        with pytest.raises(ConfigError, match="missing"):
            fm2.precision.load_state_dict(PrecisionController(["conv1"]).state_dict())
    finally:
        fm.precision.set(a=8, w=8, g=8)
        fm.train()


def test_compile_with_config_sets_initial_precision():
    torch.manual_seed(0)
    model = resnet20()
    x = torch.randn(2, 3, 32, 32)
    fm = fraccompile.compile(copy.deepcopy(model), x, fraccompile.FracConfig(a=4, w=6, g=0))
    assert all(fm.precision[s] == Precision(4, 6, 0) for s in fm.precision)
    fm = fraccompile.compile(copy.deepcopy(model), x, a=0, w=0, g=0)
    model.eval()
    fm.eval()
    model, x = in_fp32_layout(model, x, fm)
    assert torch.equal(_outputs(fm, x), _outputs(model, x))
