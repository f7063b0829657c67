import copy

import pytest
import torch

from fraccompile.examples import (
    control_flow,
    functional_model,
    mobilenetv2_cifar,
    resnet18_imagenet,
    resnet_cifar,
    transformer_lm,
)


def _tokens(b, t):
    return torch.randint(0, 65, (b, t), generator=torch.Generator().manual_seed(0))


def _images(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# name -> (factory, example input factory, compile kwargs, expected number of quantized sites)
# Expected counts: every conv/linear/attention matmul minus the first conv and the last linear.
EXAMPLES = {
    "resnet20": (resnet_cifar.resnet20, lambda: _images(2, 3, 32, 32), {}, 21 + 1 - 2),
    "resnet38": (resnet_cifar.resnet38, lambda: _images(2, 3, 32, 32), {}, 39 + 1 - 2),
    "resnet74": (resnet_cifar.resnet74, lambda: _images(2, 3, 32, 32), {}, 75 + 1 - 2),
    "mobilenetv2": (mobilenetv2_cifar.model, lambda: _images(2, 3, 32, 32), {}, 52 + 1 - 2),
    "resnet18": (resnet18_imagenet.model, lambda: _images(2, 3, 64, 64), {}, 20 + 1 - 2),
    # 13 linears + 2 attention matmuls per layer x 2 layers, minus the LM head
    "transformer": (transformer_lm.model, lambda: _tokens(2, 16), {}, 13 + 4 - 1),
    "functional": (functional_model.model, lambda: _images(2, 3, 32, 32), {}, 3 + 2 - 2),
    # export fallback; at 64x64 the `down` conv runs, and is the first conv
    "control_flow": (control_flow.model, lambda: _images(2, 3, 64, 64), {}, 3 + 1 - 2),
    # the value-dependent gate stays opaque: conv1, conv2, fc outside it
    "control_flow_leaf": (
        control_flow.ValueBranchNet,
        lambda: _images(2, 3, 32, 32),
        {"leaf_modules": ("ValueGate",)},
        2 + 1 - 2,
    ),
}


@pytest.fixture(params=sorted(EXAMPLES))
def example(request):
    factory, make_input, kwargs, n_sites = EXAMPLES[request.param]
    torch.manual_seed(0)
    model = factory()
    return request.param, model, make_input(), kwargs, n_sites


def clone(model):
    return copy.deepcopy(model)


def pytest_configure(config):
    """Kernels built by the tests go to a per-run cache, not the user's (set before any backend
    is created; an explicit FRACCOMPILE_CACHE_DIR is respected)."""
    import os
    import tempfile

    if "FRACCOMPILE_CACHE_DIR" not in os.environ:
        os.environ["FRACCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fraccompile-test-kernels-")


@pytest.fixture(scope="module")
def tvm_backend():
    """The tvm backend (tests that take it skip where TVM is unavailable by their own mark)."""
    from fraccompile.ops.backend import get_backend

    return get_backend("tvm")


# The longest instances of the per-example tests, kept out of the default run (`-m slow` runs
# them): MobileNetV2's (51 sites) through these two; its compile on the tvm backend stays in the
# default run (test_tvm_fallbacks, test_examples, test_cli).
_SLOW_INSTANCES = {
    "test_quantized_training_step_runs_and_changes_output[mobilenetv2]",
    "test_full_precision_is_bit_identical[mobilenetv2]",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in _SLOW_INSTANCES:
            item.add_marker(pytest.mark.slow)
