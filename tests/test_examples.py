"""Tests of the example models in examples/ (installed as fraccompile.examples)."""

import ast
import importlib
import operator
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from fraccompile.examples import (
    control_flow,
    functional_model,
    mobilenetv2_cifar,
    resnet18_imagenet,
    resnet_cifar,
    transformer_lm,
)

EXAMPLES_DIR = Path(resnet_cifar.__file__).parent
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if p.stem != "__init__")


def cifar_batch(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def count_modules(model, types):
    return sum(isinstance(m, types) for m in model.modules())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_all_examples_listed():
    assert EXAMPLE_NAMES == [
        "control_flow",
        "functional_model",
        "mobilenetv2_cifar",
        "resnet18_imagenet",
        "resnet_cifar",
        "transformer_lm",
    ]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_is_plain_pytorch(name):
    """Examples are self-contained: a docstring, only torch/math/typing imports, a model() factory."""
    tree = ast.parse((EXAMPLES_DIR / f"{name}.py").read_text())
    assert ast.get_docstring(tree), f"{name}.py has no module docstring"
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}.py uses a relative import"
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "math", "typing"}, roots
    module = importlib.import_module(f"fraccompile.examples.{name}")
    assert isinstance(module.model(), nn.Module)


# --- CIFAR ResNets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, depth", [(resnet_cifar.resnet20, 20), (resnet_cifar.resnet38, 38), (resnet_cifar.resnet74, 74)]
)
def test_cifar_resnet_depth(factory, depth):
    model = factory()
    n = (depth - 2) // 6
    assert sum(isinstance(m, resnet_cifar.BasicBlock) for m in model.modules()) == 3 * n
    # depth counts the stem, two convs per block and the classifier; plus two 1x1 shortcuts
    assert count_modules(model, nn.Conv2d) == 1 + 6 * n + 2
    assert count_modules(model, nn.Linear) == 1


def test_cifar_resnet_forward_and_structure():
    model = resnet_cifar.model().eval()
    assert isinstance(model, resnet_cifar.CifarResNet)
    assert model(cifar_batch()).shape == (2, 10)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 16
    assert model.conv1.bias is None
    stages = (model.layer1, model.layer2, model.layer3)
    assert [stage[0].conv1.out_channels for stage in stages] == [16, 32, 64]
    assert len(model.layer1[0].shortcut) == 0  # identity shortcut
    down = model.layer2[0].shortcut
    assert isinstance(down[0], nn.Conv2d) and down[0].kernel_size == (1, 1) and down[0].stride == (2, 2)
    assert down[0].bias is None and isinstance(down[1], nn.BatchNorm2d)
    assert model.fc.in_features == 64
    assert resnet_cifar.CifarResNet(20, num_classes=100)(cifar_batch()).shape == (2, 100)
    with pytest.raises(ValueError):
        resnet_cifar.CifarResNet(21)


# --- MobileNetV2 ---------------------------------------------------------------------------


def test_mobilenetv2_forward_and_structure():
    model = mobilenetv2_cifar.model().eval()
    assert isinstance(model, mobilenetv2_cifar.MobileNetV2)
    assert model(cifar_batch()).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].stride == (1, 1) and convs[0].out_channels == 32
    assert convs[-1].out_channels == 1280 and convs[-1].kernel_size == (1, 1)
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 17 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert sum(c.stride == (2, 2) for c in convs) == 3  # 32 -> 4
    blocks = [m for m in model.modules() if isinstance(m, mobilenetv2_cifar.InvertedResidual)]
    assert sum(b.use_residual for b in blocks) == 10
    assert len(convs) == 52 and count_modules(model, nn.Linear) == 1


# --- ResNet-18 -----------------------------------------------------------------------------


def test_resnet18_forward_and_structure():
    model = resnet18_imagenet.model().eval()
    assert isinstance(model, resnet18_imagenet.ResNet18)
    assert model(cifar_batch(2, 64)).shape == (2, 1000)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert count_modules(model, nn.Conv2d) == 20 and count_modules(model, nn.Linear) == 1
    assert model.fc.in_features == 512


# --- Transformer ---------------------------------------------------------------------------


def count_matmuls(gm: torch.fx.GraphModule) -> int:
    return sum(
        n.op == "call_function" and n.target in (torch.matmul, operator.matmul) for n in gm.graph.nodes
    )


def test_transformer_forward_and_causality():
    model = transformer_lm.model().eval()
    assert isinstance(model, transformer_lm.TransformerLM)
    idx = torch.randint(0, 65, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 65) and logits.dtype == torch.float32
    # causal: changing a later token does not change earlier logits
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 65
    logits2 = model(idx2)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    # full block size works
    assert model(torch.randint(0, 65, (1, 64))).shape == (1, 64, 65)


def test_transformer_sizes():
    default = transformer_lm.model()
    assert count_modules(default, nn.Linear) == 2 * 6 + 1
    assert count_modules(default, nn.Embedding) == 2 and count_modules(default, nn.LayerNorm) == 5
    wide = transformer_lm.model_d512()
    assert wide.tok_emb.embedding_dim == 512 and wide.blocks[0].attn.n_heads == 8 and len(wide.blocks) == 2
    assert wide(torch.randint(0, 65, (1, 8))).shape == (1, 8, 65)


def test_transformer_fx_trace_has_attention_matmuls():
    model = transformer_lm.model().eval()
    gm = torch.fx.symbolic_trace(model)
    assert count_matmuls(gm) == 4  # q @ k^T and att @ v in each of 2 layers
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(gm(idx), model(idx))
    short = torch.randint(0, 65, (2, 5))  # the traced graph is not specialised to T
    torch.testing.assert_close(gm(short), model(short))


# --- Functional model ----------------------------------------------------------------------


def test_functional_model():
    model = functional_model.model()
    assert isinstance(model, functional_model.FunctionalNet)
    assert model(cifar_batch()).shape == (2, 10)
    assert count_modules(model, (nn.Conv2d, nn.Linear)) == 0
    assert len(list(model.children())) == 0
    assert len(list(model.parameters())) == 10
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.nn.functional.conv2d) == 3
    assert targets.count(torch.nn.functional.linear) == 2
    convs = [n for n in gm.graph.nodes if n.target is torch.nn.functional.conv2d]
    assert convs[1].kwargs["stride"] == 2 and convs[1].kwargs["padding"] == 1
    assert convs[2].kwargs["groups"] == 2


# --- Tracing -------------------------------------------------------------------------------

TRACEABLE = [
    (resnet_cifar.model, (cifar_batch(),)),
    (mobilenetv2_cifar.model, (cifar_batch(),)),
    (resnet18_imagenet.model, (cifar_batch(2, 64),)),
    (transformer_lm.model, (torch.randint(0, 65, (2, 16)),)),
    (functional_model.model, (cifar_batch(),)),
]


@pytest.mark.parametrize(
    "factory, args", TRACEABLE, ids=[f.__module__.rsplit(".", 1)[-1] for f, _ in TRACEABLE]
)
def test_fx_traces_plain_models(factory, args):
    model = factory().eval()
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(*args), model(*args))


@pytest.mark.parametrize("cls", [control_flow.ShapeAdaptiveNet, control_flow.ValueBranchNet])
def test_fx_fails_on_control_flow(cls):
    model = cls()
    assert model(cifar_batch()).shape == (2, 10)
    assert model(cifar_batch(2, 64)).shape == (2, 10)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)


def test_control_flow_default_is_shape_adaptive():
    assert isinstance(control_flow.model(), control_flow.ShapeAdaptiveNet)


def test_export_specialises_shape_branch():
    model = control_flow.ShapeAdaptiveNet().eval()
    for size, n_convs in [(32, 2), (64, 3)]:
        x = cifar_batch(2, size)
        ep = torch.export.export(model, (x,), strict=False)
        convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
        assert len(convs) == n_convs
        torch.testing.assert_close(ep.module()(x), model(x))


def test_export_fails_on_value_branch():
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(control_flow.ValueBranchNet().eval(), (cifar_batch(),), strict=False)


def test_value_gate_branches_on_values():
    gate = control_flow.ValueGate()
    small, big = torch.full((4,), 0.5), torch.full((4,), 3.0)
    torch.testing.assert_close(gate(small), small)
    torch.testing.assert_close(gate(big), big * 0.5)


def test_value_branch_net_traces_with_gate_as_leaf():
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return type(m).__name__ == "ValueGate" or super().is_leaf_module(m, qualname)

    model = control_flow.ValueBranchNet().eval()
    graph = LeafTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["conv1", "gate", "conv2", "fc"]
    x = cifar_batch()
    torch.testing.assert_close(gm(x), model(x))
