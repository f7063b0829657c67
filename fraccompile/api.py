"""``fraccompile.compile``: capture → passes → FracModel. Orchestration only."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .capture import capture, warn_modes
from .config import FracConfig
from .errors import ConfigError
from .meta_keys import GM_EVAL_GRAPH, GM_EVAL_MODULES, GM_MODE_MERGE
from .model import FracModel
from .passes.pipeline import get_pipeline, run_passes
from .passes.quantize_insertion import PRECISION_MODULE


def compile(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    config: FracConfig | None = None,
    **overrides: Any,
) -> FracModel:
    """Compile ``model`` into a FracModel that trains with FracTrain semantics.

    Args:
        model: any ``nn.Module``; its parameters are shared with the result, not copied (deep-copy
            the model first to keep an untouched original).
        example_inputs: a tensor or a tuple of tensors the model accepts; shapes are specialized to
            them (MACs and costs are per step at this batch size).
        config: a :class:`FracConfig`; keyword ``overrides`` replace its fields
            (``compile(m, x, a=4, w=4, g=8)``).
    """
    if config is None:
        config = FracConfig()
    if not isinstance(config, FracConfig):
        raise ConfigError(f"config must be a FracConfig, got {type(config).__name__}")
    if overrides:
        try:
            config = config.replace(**overrides)
        except TypeError as err:
            raise ConfigError(f"unknown compile option: {err}") from None
    passes = get_pipeline(config.pipeline, config)  # fail on a bad name before capturing
    gm = capture(model, example_inputs, leaf_modules=config.leaf_modules, method=config.capture)
    eval_gm = gm.meta.pop(GM_EVAL_GRAPH, None)
    gm = run_passes(gm, passes)
    frac = FracModel(gm, gm.graph, class_name=f"Frac{type(model).__name__}")
    if hasattr(gm, PRECISION_MODULE) and PRECISION_MODULE not in dict(frac.named_children()):
        # no site reads the precision (every layer kept in full precision): fx left the
        # controller out, but fmodel.precision and the schedules still need it
        frac.add_module(PRECISION_MODULE, gm.get_submodule(PRECISION_MODULE))
    frac.frac_config = config
    frac.meta.update(gm.meta)  # capture method, regions (dfq)
    _keep_epilogue_modules(frac)
    _keep_composite_modules(frac)
    if eval_gm is not None:
        _attach_eval_graph(frac, eval_gm, type(model).__name__)
    if not frac.sites or all(s.full_precision for s in frac.sites):
        warnings.warn(
            f"{type(model).__name__} has no quantized site: the compiled model runs "
            f"it in full precision ({len(frac.fp32_ops)} GEMM-like ops left in fp32, "
            "see .fp32_ops)",
            stacklevel=2,
        )
    _attach_missing_state(frac, model)
    _keep_non_persistent(frac, model)
    if config.cuda_graphs:
        frac.enable_cuda_graphs()
    frac.train(model.training)
    return frac


def _attach_eval_graph(frac: FracModel, eval_gm, model_name: str) -> None:
    """The export path captured an eval-mode graph that differs structurally from the train-mode
    one (HF attention): run it through the same passes and let the model run it in eval mode."""
    paths = frac.meta.get(GM_EVAL_MODULES, [])
    try:
        eval_gm = run_passes(eval_gm, get_pipeline(frac.frac_config.pipeline, frac.frac_config))
        why = frac.attach_eval_graph(eval_gm)
    except Exception as err:  # noqa: BLE001 - the train graph still runs
        why = f" (its passes failed: {type(err).__name__}: {err})"
    if why:
        frac.meta.pop(GM_EVAL_MODULES, None)
        frac.meta[GM_MODE_MERGE] = paths
        warn_modes(model_name, paths, why, stacklevel=4)


def _keep_epilogue_modules(frac: nn.Module) -> None:
    """A BatchNorm fused into a site's epilogue has no graph node left, so fx did not copy it:
    put it back at its path, so that ``train()``/``eval()``, ``parameters()`` and ``to()`` reach
    the module the site calls."""
    from .ops.modules import FracOp

    norms = [
        (op.epilogue_norm_path, op.epilogue_norm)
        for op in frac.modules()
        if isinstance(op, FracOp) and op.epilogue_norm is not None
    ]
    for path, norm in norms:
        frac.add_submodule(path, norm)


def _keep_composite_modules(frac: nn.Module) -> None:
    """An ``nn.MultiheadAttention`` rewritten into sites is called by its composite site (at
    precision 0, and for its parameters), not by the graph: keep it at its path, so that
    ``train()``/``eval()``, ``parameters()``, ``to()`` and the state_dict keys reach it."""
    from .ops.attention import MultiheadAttentionSite

    kept = [(m.mha_path, m.mha) for m in frac.modules() if isinstance(m, MultiheadAttentionSite)]
    for path, mha in kept:
        frac.add_submodule(path, mha)


def _keep_non_persistent(frac: nn.Module, model: nn.Module) -> None:
    """Buffers the original registered with ``persistent=False`` (``position_ids``,
    ``inv_freq``) stay out of the compiled model's state_dict (torch.export registers every
    buffer as persistent)."""
    for path, mod in model.named_modules():
        for name in mod._non_persistent_buffers_set:
            key = f"{path}.{name}" if path else name
            *owner_path, leaf = key.split(".")
            try:
                owner = frac.get_submodule(".".join(owner_path))
            except AttributeError:
                continue
            if leaf in owner._buffers:
                owner._non_persistent_buffers_set.add(leaf)


def _attach_missing_state(frac: nn.Module, model: nn.Module) -> None:
    """Parameters and buffers the graph never reads (so fx did not copy them) are attached at
    their original paths, so the state_dict keys equal the original model's."""
    have = frac.state_dict(keep_vars=True)
    for key, value in model.state_dict(keep_vars=True).items():
        if key in have:
            continue
        *path, leaf = key.split(".")
        owner = frac
        for part in path:
            child = getattr(owner, part, None)
            if not isinstance(child, nn.Module):
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
