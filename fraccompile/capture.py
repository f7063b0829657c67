"""Graph capture: torch.fx symbolic tracing first, torch.export (non-strict, training IR) second.

``capture(model, example_inputs)`` returns a ``torch.fx.GraphModule`` that shares the model's
parameters and buffers (nothing is copied), with every node's output shape in
``node.meta["tensor_meta"]`` and the capture method in ``gm.meta["frac_capture"]``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import logging
import os
import sys
import traceback
import types
import warnings
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .capture_modes import merge_modes
from .errors import CaptureError, ShapeError
from .meta_keys import (
    GM_CAPTURE,
    GM_EVAL_GRAPH,
    GM_EVAL_MODULES,
    GM_MODE_MERGE,
    GM_OPAQUE_FNS,
    GM_STATIC_DIMS,
    IS_WRAPPED,
    META_GEMM_CALLS,
    TENSOR_META,
    TYPE,
    VAL,
)
from .passes.coverage import GemmCallRecorder


class FracTracer(fx.Tracer):
    """A tracer that also keeps user-named modules opaque: ``leaf_modules`` holds class names,
    module paths or fnmatch patterns of module paths."""

    def __init__(self, leaf_modules: Sequence[str] = ()):
        super().__init__()
        self.leaf_patterns = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        for pat in self.leaf_patterns:
            if (
                type(m).__name__ == pat
                or type(m).__qualname__ == pat
                or fnmatch.fnmatchcase(module_qualified_name, pat)
            ):
                return True
        return super().is_leaf_module(m, module_qualified_name)


def capture(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    leaf_modules: Sequence[str] = (),
    method: str = "auto",
) -> fx.GraphModule:
    """Capture ``model`` as a shape-annotated GraphModule.

    ``method`` is ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``. Raises
    :class:`CaptureError` naming the module and source line where tracing broke, and
    :class:`ShapeError` when the example inputs do not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    example_inputs = _as_tuple(example_inputs)
    fx_error: BaseException | None = None
    if method in ("auto", "fx"):
        try:
            gm = _trace_fx_modes(model, tuple(leaf_modules))
        except Exception as err:  # noqa: BLE001 - any tracing failure means "try the fallback"
            fx_error = err
        else:
            _propagate_shapes(gm, example_inputs)
            gm = _trace_through_wrapped(model, tuple(leaf_modules), example_inputs, gm)
            gm.meta[GM_CAPTURE] = "fx"
            return gm
    if method in ("auto", "export"):
        _check_runs(model, example_inputs)
        try:
            gm = _trace_export(model, example_inputs)
        except Exception as err:  # noqa: BLE001
            raise CaptureError(_capture_message(model, fx_error, err, leaf_modules)) from err
        try:
            eval_gm = _in_mode(model, False, lambda: _trace_export(model, example_inputs))
            paths = merge_modes(gm, eval_gm)
            if paths:  # structurally different: compile runs it in eval mode (FracModel)
                _in_mode(model, False, lambda: _propagate_shapes(eval_gm, example_inputs))
                gm.meta[GM_EVAL_GRAPH] = eval_gm
                gm.meta[GM_EVAL_MODULES] = _named_paths(model, paths)
        except Exception:  # noqa: BLE001 - eval capture is best effort; the train graph runs
            _merge_or_warn(gm, None, model)
        _propagate_shapes(gm, example_inputs)
        gm.meta[GM_CAPTURE] = "export"
        return gm
    if method == "fx":
        raise CaptureError(_capture_message(model, fx_error, None, leaf_modules)) from fx_error
    raise CaptureError(f"unknown capture method {method!r}: choose auto, fx or export")


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _trace_fx(model: nn.Module, leaf_modules: Sequence[str], through=frozenset()) -> fx.GraphModule:
    tracer = FracTracer(leaf_modules)
    with _unwrapped(through):
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@contextlib.contextmanager
def _unwrapped(fns):
    """While active, the ``torch.fx.wrap``'d functions ``fns`` are not patched by the tracer: their
    bodies are traced like any other code (their linears and matmuls become graph nodes)."""
    table = fx._symbolic_trace._wrapped_fns_to_patch
    removed = {key: frame for key, frame in list(table.items()) if frame.get(key[1]) in fns}
    for key in removed:
        del table[key]
    try:
        yield
    finally:
        table.update(removed)


def _trace_through_wrapped(
    model: nn.Module, leaves: tuple, example_inputs: tuple, gm: fx.GraphModule
) -> fx.GraphModule:
    """Re-trace with the ``torch.fx.wrap``'d functions that called GEMM-like ops during shape
    propagation traced through, so those GEMMs become sites. A function whose body does not trace
    (e.g. Python control flow on a shape) stays opaque; ``gm.meta[GM_OPAQUE_FNS]`` says why."""
    wrapped = {
        n.target
        for n in gm.graph.nodes
        if n.op == "call_function" and n.meta.get(IS_WRAPPED) and n.meta.get(META_GEMM_CALLS)
    }
    if not wrapped:
        return gm

    def attempt(fns):
        new = _trace_fx_modes(model, leaves, frozenset(fns))
        _propagate_shapes(new, example_inputs)
        return new

    try:
        return attempt(wrapped)
    except Exception:  # noqa: BLE001 - find which functions trace through, one at a time
        pass
    through, failed = [], {}
    for fn in sorted(wrapped, key=lambda f: getattr(f, "__qualname__", str(f))):
        try:
            attempt(through + [fn])
        except Exception as err:  # noqa: BLE001
            failed[getattr(fn, "__name__", str(fn))] = _first_line(err)
        else:
            through.append(fn)
    new = attempt(through) if through else gm
    new.meta[GM_OPAQUE_FNS] = failed
    return new


def _in_mode(model: nn.Module, training: bool, fn):
    """``fn()`` with every module of ``model`` in ``training`` mode; each module's own flag is
    restored afterwards (a submodule kept in eval stays so)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        return fn()
    finally:
        for m, flag in flags:
            m.training = flag


_GEMM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _trace_fx_modes(model: nn.Module, leaf_modules: tuple, through=frozenset()) -> fx.GraphModule:
    """The train-mode fx graph, with what differs in eval mode switched by the module's mode
    (:mod:`fraccompile.capture_modes`). A module whose forward branches on ``self.training``
    around different ops is kept opaque (a leaf follows its own mode) when it holds no GEMM
    layer; otherwise a warning names it."""
    leaves = list(leaf_modules)
    for _ in range(4):
        trace = functools.partial(_trace_fx, model, leaves, through)
        gm = _in_mode(model, True, trace)
        eval_gm = _in_mode(model, False, trace)
        paths = merge_modes(gm, eval_gm)
        if not paths:
            return gm
        opaque = [
            p
            for p in paths
            if p
            and p not in leaves
            and not any(isinstance(m, _GEMM_LAYERS) for m in model.get_submodule(p).modules())
        ]
        if not opaque:
            break
        leaves += opaque
    _merge_or_warn(gm, None, model, paths)
    return gm


def _merge_or_warn(gm: fx.GraphModule, eval_gm, model: nn.Module, paths=None) -> None:
    if paths is None:
        paths = ["<capture in eval mode failed>"] if eval_gm is None else merge_modes(gm, eval_gm)
    if paths:
        paths = _named_paths(model, paths)
        gm.meta[GM_MODE_MERGE] = paths
        warn_modes(type(model).__name__, paths, stacklevel=4)


def _named_paths(model: nn.Module, paths) -> list[str]:
    named = dict(model.named_modules())
    return sorted({p for p in paths if p in named and p} or {"<root>"})


def warn_modes(model_name: str, paths: Sequence[str], why: str = "", stacklevel: int = 3) -> None:
    warnings.warn(
        f"{model_name}: the eval-mode graph of {', '.join(map(repr, paths))} differs "
        f"from the train-mode one in more than constants{why}; the compiled model runs "
        "the train-mode graph there in both modes",
        stacklevel=stacklevel,
    )


@contextlib.contextmanager
def _quiet():
    """torch.export prints partial graphs and symbolic-shape warnings to stderr when it fails; the
    CaptureError we raise says what matters in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _dynamic_shapes(example_inputs: tuple):
    """Every dimension of every tensor input as ``Dim.AUTO``: export keeps the ones the model
    does not specialize symbolic (batch, sequence length, image size)."""
    auto = torch.export.Dim.AUTO
    return tuple(
        {d: auto for d in range(t.dim())} if isinstance(t, torch.Tensor) else None for t in example_inputs
    )


def _trace_export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """torch.export (non-strict, training IR) with dynamic dimensions where the model allows;
    static shapes when dynamic export fails. ``gm.meta[GM_STATIC_DIMS]`` lists the batch and
    sequence dimensions that stayed static, in one line each."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        with _quiet():
            try:
                ep = torch.export.export(
                    model, example_inputs, strict=False, dynamic_shapes=_dynamic_shapes(example_inputs)
                )
                dynamic = True
            except Exception:  # noqa: BLE001 - some models only export with static shapes
                ep = torch.export.export(model, example_inputs, strict=False)
                dynamic = False
    finally:
        for m, flag in flags:
            m.training = flag
    gm = ep.module()
    # ep.module() forbids train()/eval(); our GraphModule is rebuilt from its graph later, where
    # the mode-dependent ops follow the module's mode (capture_modes.merge_modes)
    gm.meta[GM_STATIC_DIMS] = _static_dims(gm, example_inputs, dynamic)
    return gm


def _static_dims(gm: fx.GraphModule, example_inputs: tuple, dynamic: bool) -> list[str]:
    """The batch dimension of each tensor input, and the sequence dimension of integer (token)
    inputs, that the exported graph is specialized to."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, t) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        val = node.meta.get(VAL)
        dims = [0] + ([1] if t.dim() > 1 and not t.is_floating_point() else [])
        for d in dims:
            size = val.shape[d] if val is not None and d < len(val.shape) else t.shape[d]
            static = (
                isinstance(size, int)
                or getattr(getattr(size, "node", None), "expr", None) is not None
                and size.node.expr.is_number
            )
            if not dynamic or static:
                kind = "batch" if d == 0 else "sequence"
                out.append(
                    f"input {i} ({node.name}) {kind} dimension {d} is static: only size "
                    f"{int(t.shape[d])} runs (the model specializes it)"
                )
    return out


def _snapshot_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def _run_quietly(fn):
    """Run ``fn`` without touching the model's buffers (BN statistics) or the global RNG."""

    def wrapped(model: nn.Module, *args):
        saved = _snapshot_buffers(model)
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                return fn(model, *args)
        finally:
            for buf, value in saved:
                buf.copy_(value)

    return wrapped


class _ShapeRecorder(fx.Interpreter):
    """Records each node's output as ``meta["tensor_meta"]`` (what torch's ShapeProp does, without
    its printing a traceback to stderr when a node fails), and the GEMM-like torch calls made inside
    opaque nodes (leaf modules, wrapped functions) as ``meta["frac_gemm_calls"]``."""

    def run_node(self, n: fx.Node):
        if n.op == "call_module" or (n.op == "call_function" and isinstance(n.target, types.FunctionType)):
            with GemmCallRecorder() as rec:
                result = super().run_node(n)
            if rec.calls:
                n.meta[META_GEMM_CALLS] = rec.calls
        else:
            result = super().run_node(n)
        meta = map_aggregate(
            result, lambda r: _extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else None
        )
        if meta is not None and not (isinstance(meta, (tuple, list)) and all(m is None for m in meta)):
            n.meta[TENSOR_META] = meta
        n.meta[TYPE] = type(result)
        return result


@_run_quietly
def _shape_prop(gm: fx.GraphModule, example_inputs: tuple) -> None:
    _ShapeRecorder(gm).run(*example_inputs)


@_run_quietly
def _plain_run(model: nn.Module, example_inputs: tuple) -> None:
    model(*example_inputs)


def _shape_message(example_inputs: tuple, err: BaseException) -> str:
    shapes = ", ".join(
        str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs
    )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"example input of shape {shapes} does not fit the model: {first}"


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    try:
        _shape_prop(gm, example_inputs)
    except Exception as err:  # noqa: BLE001
        cause = err.__cause__ or err
        raise ShapeError(_shape_message(example_inputs, cause)) from err


def _check_runs(model: nn.Module, example_inputs: tuple) -> None:
    """Run the model eagerly once, so a shape mismatch is reported as such, not as a capture error."""
    try:
        _plain_run(model, example_inputs)
    except Exception as err:  # noqa: BLE001
        raise ShapeError(_shape_message(example_inputs, err)) from err


def _user_frame(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and fraccompile: the user's line that broke."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(__file__), sys.prefix + os.sep + "lib")
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if not f.filename.startswith(skip)]
    return user[-1] if user else None


def _failing_module(model: nn.Module, err: BaseException) -> str | None:
    """The path of the innermost module whose ``forward`` was running when ``err`` was raised."""
    paths = {id(m): name for name, m in model.named_modules()}
    found = None
    tb = err.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and id(candidate) in paths:
            found = paths[id(candidate)]
        tb = tb.tb_next
    return found


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _capture_message(
    model: nn.Module,
    fx_error: BaseException | None,
    export_error: BaseException | None,
    leaf_modules: Sequence[str],
) -> str:
    parts = [f"cannot capture {type(model).__name__}"]
    where_err = fx_error or export_error
    module_path = _failing_module(model, where_err) if where_err is not None else None
    frame = _user_frame(where_err) if where_err is not None else None
    if module_path is not None:
        mod = model.get_submodule(module_path) if module_path else model
        parts.append(f"in module '{module_path or '<root>'}' ({type(mod).__name__})")
    if frame is not None:
        parts.append(f"at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`")
    reasons = []
    if fx_error is not None:
        reasons.append(f"torch.fx: {_first_line(fx_error)}")
    if export_error is not None:
        reasons.append(f"torch.export: {_first_line(export_error)}")
    hint = ""
    if module_path:
        name = type(model.get_submodule(module_path)).__name__
        hint = f'; keep that module opaque with leaf_modules=["{name}"] (CLI: --leaf {name})'
    elif not leaf_modules:
        hint = "; keep the offending submodule opaque with leaf_modules=[...] (CLI: --leaf NAME)"
    return " ".join(parts) + " (" + "; ".join(reasons) + ")" + hint
