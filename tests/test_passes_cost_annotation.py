"""cost-annotation: the graph is unchanged; every SiteInfo gets the MACs of one step."""

import torch
import torch.nn.functional as F
from _pass_helpers import graph, seeded
from torch import nn

from fraccompile import FracConfig
from fraccompile.capture import capture
from fraccompile.meta_keys import META_FP_LAYER, META_SITE, META_SITE_PARTS
from fraccompile.passes import get_pass
from fraccompile.passes.cost_annotation import site_macs


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, stride=2)  # kept in fp32: MACs all the same
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.shared = nn.Linear(8, 8)  # called twice: one site, MACs of both calls
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.dw(self.stem(x)).mean((2, 3))
        h = self.shared(torch.relu(self.shared(h)))
        a = torch.matmul(h.unsqueeze(2), h.unsqueeze(1))  # (N, 8, 1) @ (N, 1, 8)
        return self.head(a.mean(1))


X = torch.randn(2, 3, 8, 8)


def _infos(gm):
    out = {}
    for n in gm.graph.nodes:
        info = n.meta.get(META_SITE) or n.meta.get(META_FP_LAYER)
        if info is not None:
            out[info.name] = info
        for info, _ in n.meta.get(META_SITE_PARTS, []):
            out[info.name] = info
    return out


def test_graph_is_unchanged_and_macs_are_filled_in():
    gm = graph(seeded(Before), X, passes=["quantize-insertion"])
    code = gm.code
    assert {name: i.macs for name, i in _infos(gm).items()} == {
        "stem": 0,
        "dw": 0,
        "shared": 0,
        "matmul": 0,
        "head": 0,
    }
    result = get_pass("cost-annotation").run(gm)
    assert not result.modified and result.graph_module.code == code
    # out elements x (Cin/groups x kh x kw); linear: out elements x in features; matmul: x K
    assert {name: i.macs for name, i in _infos(gm).items()} == {
        "stem": 2 * 8 * 4 * 4 * 3 * 9,
        "dw": 2 * 8 * 4 * 4 * 2 * 9,
        "shared": 2 * (2 * 8 * 8),
        "matmul": 2 * 8 * 8 * 1,
        "head": 2 * 3 * 8,
    }
    assert _infos(gm)["shared"].calls == 2


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_composite_parts_get_their_own_macs():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8)
    v = torch.randn(2, 3, 6, 5)
    gm = graph(
        Attention(),
        q,
        k,
        v,
        passes=["quantize-insertion", "cost-annotation"],
        config=FracConfig(full_precision=()),
    )
    macs = {name: i.macs for name, i in _infos(gm).items()}
    assert macs == {"sdpa.qk": 2 * 3 * 4 * 6 * 8, "sdpa.av": 2 * 3 * 4 * 5 * 6}


def test_site_macs_formulas():
    assert site_macs("conv", (1, 4, 6, 6), (8, 2, 3, 3), (1, 8, 6, 6)) == 8 * 36 * 2 * 9
    assert site_macs("linear", (5, 7), (3, 7), (5, 3)) == 5 * 3 * 7
    assert site_macs("matmul", (2, 5, 7), (2, 7, 3), (2, 5, 3)) == 2 * 5 * 3 * 7
    assert site_macs("linear", (5, 7), (), ()) == 0  # shapes unknown: no cost


def test_run_twice_does_not_double_count():
    gm = graph(seeded(Before), X, passes=["quantize-insertion", "cost-annotation"])
    first = {name: i.macs for name, i in _infos(gm).items()}
    get_pass("cost-annotation").run(gm)
    assert {name: i.macs for name, i in _infos(gm).items()} == first


def test_without_sites_it_has_nothing_to_count():
    """Alone on a captured graph (no quantize-insertion): no SiteInfo exists; the pipeline refuses
    this order (tests/test_passes_pipeline.py), and the pass itself finds nothing."""
    gm = capture(seeded(Before), X)
    get_pass("cost-annotation").run(gm)
    assert _infos(gm) == {}
