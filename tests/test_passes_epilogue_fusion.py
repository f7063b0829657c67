"""epilogue-fusion: Before module -> Expected graph (FileCheck on ``gm.code``). The pass acts on a
backend with the INTEGER_KERNELS capability, whatever its name (a test backend here); the values
and gradients are those of the unfused graph."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _pass_helpers import graph, register_capable, seeded
from torch import nn
from torch.testing import FileCheck

from fraccompile import FracConfig
from fraccompile.meta_keys import META_SITE
from fraccompile.ops import FracOp

PASSES = ["quantize-insertion", "epilogue-fusion"]


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # kept in fp32: its ReLU is not an epilogue
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.conv(h)))
        h = h.mean((2, 3))
        return self.head(F.gelu(self.fc(h)))


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _fused(monkeypatch, recompute):
    cfg = FracConfig(a=8, w=8, g=8, backend=register_capable(monkeypatch), recompute=recompute)
    return graph(seeded(Before), X, passes=PASSES, config=cfg)


def test_activation_after_a_site_becomes_its_epilogue(monkeypatch):
    gm = _fused(monkeypatch, "activations")
    (
        FileCheck()
        .check("stem = self.stem(x)")
        .check_next("masked_relu = fraccompile_ops_functions_masked_relu(stem)")  # not after a site
        .check("conv = self.conv(masked_relu, prec_conv)")
        .check_next("bn = self.bn(conv)")  # recompute="activations": the norm stays
        .check_next("masked_relu_1 = fraccompile_ops_functions_masked_relu(bn)")
        .check("fc = self.fc(mean, prec_fc)")
        .check_next("head = self.head(fc)")  # the GELU is the fc site's epilogue
        .run(gm.code)
    )
    FileCheck().check_not("gelu").check_not("torch.relu").run(gm.code)
    assert gm.fc.epilogue is not None and gm.conv.epilogue is None
    fc = next(n for n in gm.graph.nodes if n.name == "fc")
    assert fc.meta[META_SITE].extra["epilogue"] == gm.fc.describe_epilogue()


def test_with_norms_the_batchnorm_joins_the_epilogue(monkeypatch):
    gm = _fused(monkeypatch, "norms")
    (
        FileCheck()
        .check("conv = self.conv(masked_relu, prec_conv)")
        .check_next("mean = conv.mean((2, 3))")
        .run(gm.code)
    )
    FileCheck().check_not("self.bn(").run(gm.code)
    assert isinstance(gm.conv, FracOp) and gm.conv.epilogue_norm is not None
    assert gm.conv.epilogue_norm_path == "bn"


@pytest.mark.parametrize("recompute", ["activations", "norms"])
def test_values_and_gradients_are_the_unfused_graphs(monkeypatch, recompute):
    cfg = FracConfig(a=8, w=8, g=8, backend=register_capable(monkeypatch), recompute=recompute)
    model = seeded(Before)
    fused = graph(copy.deepcopy(model), X, passes=PASSES, config=cfg)
    plain = graph(copy.deepcopy(model), X, passes=["quantize-insertion"], config=cfg)
    out = []
    for gm in (fused, plain):
        torch.manual_seed(1)
        y = gm(X)
        y.square().sum().backward()
        out.append((y, {k: p.grad for k, p in gm.named_parameters()}))
    (y1, g1), (y2, g2) = out
    assert torch.isfinite(y1).all() and torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6), k


def test_no_integer_kernels_no_change():
    before = graph(seeded(Before), X, passes=["quantize-insertion"])
    after = graph(seeded(Before), X, passes=PASSES, config=FracConfig(backend="reference"))
    assert after.code == before.code


def test_recompute_none_no_change(monkeypatch):
    cfg = FracConfig(backend=register_capable(monkeypatch), recompute="none")
    before = graph(seeded(Before), X, passes=["quantize-insertion"], config=cfg)
    after = graph(seeded(Before), X, passes=PASSES, config=cfg)
    assert after.code == before.code


def test_a_site_read_twice_keeps_its_activation(monkeypatch):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.b(self.a(x))
            return F.gelu(h) + h

    cfg = FracConfig(backend=register_capable(monkeypatch), full_precision=())
    gm = graph(Twice(), torch.randn(2, 4), passes=PASSES, config=cfg)
    FileCheck().check("b = self.b(a, prec_b)").check("gelu(b)").run(gm.code)
    assert gm.b.epilogue is None
