"""gating-insertion: Before module -> Expected graph (FileCheck on ``gm.code``): one DFQ gate per
region, right after the region's entry, feeding its sites' precision nodes, the LSTM state flowing
from gate to gate."""

import functools

import pytest
import torch
from _pass_helpers import ResidualNet, graph, seeded
from torch import nn
from torch.testing import FileCheck

from fraccompile import FracConfig, PassError
from fraccompile.control.gates import GateBank
from fraccompile.meta_keys import GATES, META_GATE, META_PRECISION_NODE
from fraccompile.passes import get_pass, run_passes
from fraccompile.passes.gating_insertion import GATES_MODULE

# a kept stem, a residual block, a lone linear (6 outputs), a kept head
Before = functools.partial(ResidualNet, hidden=6)


X = torch.randn(2, 3, 6, 6)
UPSTREAM = ["quantize-insertion", "region-discovery"]


def test_expected_graph():
    gm = graph(seeded(Before), X, passes=[*UPSTREAM, "gating-insertion"])
    (
        FileCheck()
        .check("relu = torch.relu(stem)")
        .check_next("gate_region0 = self.frac_gates('region0', relu, None)")
        .check_next("prec_block_conv1 = self.frac_precision('block.conv1', gate_region0)")
        .check("prec_block_conv2 = self.frac_precision('block.conv2', gate_region0)")
        .check("mean = relu_2.mean((2, 3))")
        .check_next("gate_region1 = self.frac_gates('region1', mean, gate_region0)")
        .check_next("prec_fc = self.frac_precision('fc', gate_region1)")
        .run(gm.code)
    )
    FileCheck().check_count("self.frac_gates(", 2, exactly=True).run(gm.code)
    gates = [n for n in gm.graph.nodes if META_GATE in n.meta]
    assert [(g.name, g.meta[META_GATE]) for g in gates] == [
        ("gate_region0", "region0"),
        ("gate_region1", "region1"),
    ]
    precs = {
        n.meta[META_PRECISION_NODE]: n.args[1].name for n in gm.graph.nodes if META_PRECISION_NODE in n.meta
    }
    assert precs == {"block.conv1": "gate_region0", "block.conv2": "gate_region0", "fc": "gate_region1"}


def test_gate_bank_reads_each_region_entry():
    cfg = FracConfig(gate_a=(2, 4), gate_g=(8, 8), gate_hidden=16)
    gm = graph(seeded(Before), X, passes=[*UPSTREAM, "gating-insertion"], config=cfg)
    bank = gm.get_submodule(GATES_MODULE)
    assert isinstance(bank, GateBank)
    # conv regions read channels (dim 1) of the entry; linear regions its last dim
    assert bank.feature_dim == {"region0": 1, "region1": 1}
    assert {r: p.in_features for r, p in bank.proj.items()} == {"region0": 4, "region1": 4}
    assert (bank.a, bank.g, bank.lstm.hidden_size) == ((2, 4), (8, 8), 16)
    assert torch.isfinite(gm(X)).all()


def test_the_pipeline_refuses_gating_without_regions():
    gm = graph(seeded(Before), X, passes=["quantize-insertion"])
    with pytest.raises(PassError, match="'gating-insertion' requires 'regions'.*'region-discovery'"):
        run_passes(gm, [get_pass("gating-insertion")])


def test_no_regions_no_gates():
    class Flat(nn.Module):
        def forward(self, x):
            return x * 2

    gm = graph(Flat(), X, passes=[*UPSTREAM, "gating-insertion"])
    assert not hasattr(gm, GATES_MODULE) and "frac_gates" not in gm.code
    assert GATES in gm.meta["frac_properties"]
