"""channels-last: Before module -> Expected graph (FileCheck on ``gm.code``). A 2-D conv kept in
fp32 reads a channels-last input on a backend with the CHANNELS_LAST capability, whatever its name
(a test backend here); elsewhere the graph is unchanged."""

import torch
from _pass_helpers import graph, register_capable, seeded
from torch import nn
from torch.testing import FileCheck

from fraccompile import FracConfig
from fraccompile.meta_keys import TENSOR_META

PASSES = ["quantize-insertion", "channels-last"]


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # kept in fp32 (@first_conv)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)  # a site: its layout is the backend's business
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def test_kept_conv_reads_channels_last(monkeypatch):
    cfg = FracConfig(backend=register_capable(monkeypatch))
    gm = graph(seeded(Before), X, passes=PASSES, config=cfg)
    (
        FileCheck()
        .check("contiguous = x.contiguous(memory_format = torch.channels_last)")
        .check_next("stem = self.stem(contiguous)")
        .check("conv = self.conv(relu, prec_conv)")
        .run(gm.code)
    )
    FileCheck().check_count(".contiguous(", 1, exactly=True).run(gm.code)
    node = next(n for n in gm.graph.nodes if n.name == "contiguous")
    assert tuple(node.meta[TENSOR_META].shape) == tuple(X.shape)  # shapes still propagate


def test_values_are_the_nchw_graphs(monkeypatch):
    cfg = FracConfig(a=0, w=0, g=0, backend=register_capable(monkeypatch))
    model = seeded(Before)
    gm = graph(model, X, passes=PASSES, config=cfg)
    torch.testing.assert_close(gm(X), model(X), rtol=1e-5, atol=1e-6)


def test_without_the_capability_the_graph_is_unchanged():
    before = graph(seeded(Before), X, passes=["quantize-insertion"])
    after = graph(seeded(Before), X, passes=PASSES, config=FracConfig(backend="reference"))
    assert after.code == before.code and "contiguous" not in after.code


def test_kept_1d_conv_is_left_alone(monkeypatch):
    class Conv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(3, 4, 3)

        def forward(self, x):
            return self.stem(x)

    cfg = FracConfig(backend=register_capable(monkeypatch))
    gm = graph(Conv1d(), torch.randn(2, 3, 8), passes=PASSES, config=cfg)
    assert "contiguous" not in gm.code
