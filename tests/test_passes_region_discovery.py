"""region-discovery: Before module -> Expected regions (the graph itself is unchanged), and the
expected gateable regions of every example model."""

import pytest
import torch
from _pass_helpers import ResidualNet, graph, seeded

import fraccompile
from fraccompile.examples import (
    functional_model,
    mobilenetv2_cifar,
    resnet18_imagenet,
    resnet_cifar,
    transformer_lm,
)
from fraccompile.meta_keys import GM_REGIONS, META_REGION
from fraccompile.passes import get_pass
from fraccompile.passes.region_discovery import Region, find_regions

Before = ResidualNet  # a kept stem, a residual block with an identity shortcut, a lone linear, a kept head


def test_expected_regions_and_tags():
    gm = graph(seeded(Before), torch.randn(2, 3, 6, 6), passes=["quantize-insertion"])
    code = gm.code
    result = get_pass("region-discovery").run(gm)
    assert not result.modified and gm.code == code
    assert gm.meta[GM_REGIONS] == [
        Region(
            "region0",
            "residual",
            entry="relu",
            exit="add",
            sites=["block.conv1", "block.conv2"],
            skippable=True,
        ),
        Region("region1", "site", entry="mean", exit="fc", sites=["fc"]),
    ]
    tags = {n.name: n.meta[META_REGION] for n in gm.graph.nodes if META_REGION in n.meta}
    assert tags == {
        "block_conv1": "region0",
        "relu_1": "region0",
        "block_conv2": "region0",
        "add": "region0",
        "fc": "region1",
    }


def regions_of(model, x):
    return find_regions(fraccompile.compile(model, x))


def test_resnet20_has_one_region_per_block():
    regions = regions_of(resnet_cifar.resnet20(), torch.randn(2, 3, 32, 32))
    assert len(regions) == 9 and {r.kind for r in regions} == {"residual"}
    assert regions[0].sites == ["layer1.0.conv1", "layer1.0.conv2"]
    assert regions[0].skippable  # identity shortcut
    # a downsampling block carries its shortcut conv, and cannot be skipped
    assert regions[3].sites == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0"]
    assert not regions[3].skippable
    assert [r.skippable for r in regions].count(False) == 2
    assert sum(len(r.sites) for r in regions) == 20  # every site is in exactly one region


@pytest.mark.parametrize("factory, blocks", [(resnet_cifar.resnet38, 18), (resnet_cifar.resnet74, 36)])
def test_deeper_cifar_resnets(factory, blocks):
    regions = regions_of(factory(), torch.randn(2, 3, 32, 32))
    assert len(regions) == blocks and all(r.kind == "residual" for r in regions)


def test_resnet18_regions():
    regions = regions_of(resnet18_imagenet.model(), torch.randn(2, 3, 64, 64))
    assert [len(r.sites) for r in regions] == [2, 2, 3, 2, 3, 2, 3, 2]


def test_transformer_sublayers_are_regions():
    regions = regions_of(transformer_lm.model(), torch.zeros(2, 8, dtype=torch.long))
    assert [r.sites for r in regions[:2]] == [
        [
            "blocks.0.attn.q",
            "blocks.0.attn.k",
            "blocks.0.attn.v",
            "blocks.0.attn.matmul",
            "blocks.0.attn.matmul_1",
            "blocks.0.attn.proj",
        ],
        ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"],
    ]
    assert len(regions) == 4 and all(r.kind == "residual" and r.skippable for r in regions)


def test_mobilenetv2_residual_blocks_and_lone_layers():
    regions = regions_of(mobilenetv2_cifar.model(), torch.randn(2, 3, 32, 32))
    residual = [r for r in regions if r.kind == "residual"]
    assert len(residual) == 10 and all(len(r.sites) == 3 for r in residual)
    lone = [r for r in regions if r.kind == "site"]
    assert len(lone) == 51 - 30 and all(len(r.sites) == 1 for r in lone)


def test_functional_model_has_only_lone_sites():
    regions = regions_of(functional_model.model(), torch.randn(2, 3, 32, 32))
    assert [(r.kind, r.sites) for r in regions] == [
        ("site", ["conv2d_1"]),
        ("site", ["conv2d_2"]),
        ("site", ["linear"]),
    ]


def test_region_meta_tags_the_nodes():
    fm = fraccompile.compile(resnet_cifar.resnet20(), torch.randn(2, 3, 32, 32))
    regions = find_regions(fm)
    tagged = {n.name for n in fm.graph.nodes if n.meta.get(META_REGION) == regions[0].name}
    assert {"layer1_0_conv1", "layer1_0_bn1", "layer1_0_conv2", "add"} <= tagged
    assert "relu" not in tagged  # the entry feeds the region; it is not inside it
