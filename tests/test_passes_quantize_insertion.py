"""quantize-insertion: Before module -> Expected graph (FileCheck on ``gm.code``) and metadata."""

import torch
import torch.nn.functional as F
from _pass_helpers import graph, seeded
from torch import nn
from torch.testing import FileCheck

from fraccompile import FracConfig
from fraccompile.meta_keys import (
    GM_FP32_OPS,
    META_CALL_SHAPES,
    META_FP_LAYER,
    META_NOT_SITE,
    META_PRECISION_NODE,
    META_SITE,
    META_SITE_PARTS,
)
from fraccompile.ops import FracOp


class Before(nn.Module):
    """A module conv, a functional linear and a matmul of two activations, between a first conv
    and a last linear that the default config keeps in fp32."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 4))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.conv(torch.relu(self.stem(x)))
        z = F.linear(h.mean((2, 3)), self.w)
        a = torch.matmul(z.unsqueeze(2), z.unsqueeze(1))
        return self.head(a.mean(1))


X = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))


def after(config=None):
    return graph(seeded(Before), X, passes=["quantize-insertion"], config=config)


def test_expected_graph():
    gm = after()
    (
        FileCheck()
        .check("stem = self.stem(x)")  # kept in fp32 (@first_conv): no precision node
        .check("prec_conv = self.frac_precision('conv')")
        .check("conv = self.conv(relu, prec_conv)")  # the module becomes a FracOp in place
        .check("prec_linear = self.frac_precision('linear')")
        .check("linear_site = self.frac_sites.linear(mean, w, prec_linear)")
        .check("prec_matmul = self.frac_precision('matmul')")
        .check("matmul_site = self.frac_sites.matmul(unsqueeze, unsqueeze_1, prec_matmul)")
        .check("head = self.head(")  # kept in fp32 (@last_linear)
        .check_not("frac_precision")
        .run(gm.code)
    )
    FileCheck().check_count("self.frac_precision(", 3, exactly=True).run(gm.code)
    FileCheck().check_not("torch.matmul(").check_not("linear(mean, w)").run(gm.code)


def test_sites_share_the_original_parameters():
    model = seeded(Before)
    weight = model.conv.weight
    gm = graph(model, X, passes=["quantize-insertion"])
    assert isinstance(gm.conv, FracOp) and gm.conv.weight is weight
    assert type(gm.stem) is nn.Conv2d and type(gm.head) is nn.Linear
    assert isinstance(gm.frac_sites.linear, FracOp) and isinstance(gm.frac_sites.matmul, FracOp)
    assert gm.frac_precision.controller.sites == ["conv", "linear", "matmul"]


def test_metadata():
    gm = after(FracConfig(a=4, w=4, g=8))
    nodes = {n.name: n for n in gm.graph.nodes}
    conv = nodes["conv"].meta[META_SITE]
    assert (conv.name, conv.kind, conv.source, conv.module_path) == ("conv", "conv", "module", "conv")
    assert nodes["conv"].meta[META_CALL_SHAPES] == ((2, 4, 5, 5), (4, 4, 3, 3), (2, 4, 5, 5))
    assert conv.macs == 0  # cost-annotation's job
    linear = nodes["linear_site"].meta[META_SITE]
    assert (linear.kind, linear.source, linear.weight_shape) == ("linear", "functional", (6, 4))
    matmul = nodes["matmul_site"].meta[META_SITE]
    assert (matmul.kind, matmul.input_shape, matmul.weight_shape) == ("matmul", (2, 6, 1), (2, 1, 6))
    assert nodes["prec_conv"].meta[META_PRECISION_NODE] == "conv"
    assert nodes["stem"].meta[META_FP_LAYER].full_precision
    assert nodes["head"].meta[META_FP_LAYER].name == "head"
    kept = "kept in full precision (FracConfig.full_precision)"
    assert [(o.node, o.op, o.reason) for o in gm.meta[GM_FP32_OPS]] == [
        ("stem", "conv2d s=1,1", kept),
        ("head", "linear", kept),
    ]


def test_at_precision_zero_the_graph_computes_the_original():
    model = seeded(Before)
    gm = graph(model, X, passes=["quantize-insertion"], config=FracConfig(a=0, w=0, g=0))
    assert torch.equal(gm(X), model(X))


def test_quantized_graph_stays_close_to_the_original():
    model = seeded(Before)
    gm = graph(model, X, passes=["quantize-insertion"], config=FracConfig(a=8, w=8, g=8))
    y, y_ref = gm(X), model(X)
    assert torch.isfinite(y).all() and not torch.equal(y, y_ref)
    assert (y - y_ref).abs().max() <= 0.05 * y_ref.abs().max()


class Composite(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_composite_site_has_one_precision_node_per_part():
    q = torch.randn(2, 3, 4, 8)
    gm = graph(Composite(), q, q, q, passes=["quantize-insertion"], config=FracConfig(full_precision=()))
    (
        FileCheck()
        .check("prec_sdpa_qk = self.frac_precision('sdpa.qk')")
        .check("prec_sdpa_av = self.frac_precision('sdpa.av')")
        .check("self.frac_sites.sdpa(q, k, v, None, 0.0, False, None, False, prec_sdpa_qk, prec_sdpa_av)")
        .check_not("scaled_dot_product_attention")
        .run(gm.code)
    )
    (node,) = [n for n in gm.graph.nodes if META_SITE_PARTS in n.meta]
    assert [(i.name, s) for i, s in node.meta[META_SITE_PARTS]] == [
        ("sdpa.qk", ((2, 3, 4, 8), (2, 3, 8, 4), (2, 3, 4, 4))),
        ("sdpa.av", ((2, 3, 4, 4), (2, 3, 4, 8), (2, 3, 4, 8))),
    ]


class Vector(nn.Module):
    def forward(self, x, v):
        return torch.matmul(x, v)


def test_a_vector_product_is_not_a_site_and_says_why():
    gm = graph(Vector(), torch.randn(3, 4), torch.randn(4), passes=["quantize-insertion"])
    FileCheck().check("torch.matmul(x, v)").check_not("frac_precision").run(gm.code)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.meta[META_NOT_SITE] == "a vector product (not a GEMM)"
    assert [o.reason for o in gm.meta[GM_FP32_OPS]] == ["a vector product (not a GEMM)"]
