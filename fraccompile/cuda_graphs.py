"""CUDA-graph capture of a compiled model's training step: ``FracConfig(cuda_graphs=True)``.

What is graphed: the compiled module's forward and its backward, through
``torch.cuda.make_graphed_callables`` (one graph for the forward, one for the backward, inside one
autograd node). The loss, ``loss.backward()``'s call, the optimizer and :meth:`FracModel.frac_step`
stay eager, so the option works in any training loop and in :func:`fraccompile.train.fit` alike
(docs/cuda.md says why this, and not one graph around the whole step).

A graph is valid for one *signature*, and is never replayed under another:

* the precisions of every site (the controller's values are Python numbers, baked into the graph
  at capture): when they change (a PFQ turning point, ``fmodel.precision.set``), every graph is
  dropped and the next step captures again;
* the parameters and buffers (their addresses: ``.to()`` or ``load_state_dict(assign=True)``
  replaces them), which parameters require gradients, and the submodules' train/eval modes:
  same;
* the inputs' shapes, strides, dtypes and devices, and the autocast state: a new signature is
  captured beside the others, and the :data:`MAX_GRAPHS` most recently used ones are kept (a
  full batch and an epoch's shorter last batch both replay).

Only forward passes in training mode with autograd enabled are graphed; eval mode and
``torch.no_grad()`` run the model as usual. A graphed call takes positional tensors on a CUDA
device; anything else (CPU tensors in particular) is refused with :class:`CudaGraphError`.

Capturing runs :data:`WARMUP_ITERS` warm-up forwards and backwards (kernel builds and lazy
initialisation happen there, outside the graph); their effect on the buffers (BatchNorm
statistics, the sites' running ranges) is undone, so a captured step counts once. They do draw
from the random generators. An op that reads a GPU value on the host (``.item()``,
``bool(tensor)``) cannot be captured: the capture fails and :class:`CudaGraphError` says so and
how to turn the option off.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import FracCompileError

MAX_GRAPHS = 2  # input signatures kept per precision setting (least recently used dropped)
WARMUP_ITERS = 3  # make_graphed_callables' default
CHURN_WARN_AFTER = 8  # captures before a "graphs are captured almost every step" warning

OFF_HINT = (
    "train without graphs with FracConfig(cuda_graphs=False) (`cuda_graphs = false` in a "
    "config file); docs/cuda.md lists what the option needs"
)


class CudaGraphError(FracCompileError):
    """A training step that ``FracConfig(cuda_graphs=True)`` cannot capture or replay."""


def refusal_reason(model: nn.Module) -> str | None:
    """Why ``model``'s training step can never be graphed (checked at compile time), else None."""
    if getattr(model, "frac_gates", None) is not None:
        return (
            "the model has DFQ gates: they choose each sample's precision from the data (routed "
            "sites group the batch by precision, a data-dependent shape) and their decisions feed "
            "the cost regularizer and the cost accounting outside the forward"
        )
    return None


# -- what a graph is valid for ----------------------------------------------------------------------
def _is_cuda(t: torch.Tensor) -> bool:  # (tests replace it to run the bookkeeping on the CPU)
    return t.is_cuda


def precision_key(model) -> tuple:
    """Every site's precision: baked into a graph at capture."""
    return tuple(model.precision.items())


def state_key(model: nn.Module) -> tuple:
    """The parameters and buffers a graph reads and writes (their addresses), which parameters
    get gradients, and each submodule's train/eval mode (a BatchNorm frozen in eval mode inside a
    model in training mode, say)."""
    params = tuple((p.data_ptr(), p.requires_grad) for p in model.parameters())
    modes = tuple(m.training for m in model.modules())
    return params, tuple(b.data_ptr() for b in model.buffers()), modes


def autocast_key(device_type: str) -> tuple:
    if not torch.is_autocast_enabled(device_type):
        return ()
    if torch.is_autocast_cache_enabled():
        raise CudaGraphError(
            "FracConfig.cuda_graphs = True under torch.autocast needs its weight cache off: "
            f"torch.autocast({device_type!r}, ..., cache_enabled=False) (a CUDA graph cannot "
            f"hold the cache), or {OFF_HINT}"
        )
    return (torch.get_autocast_dtype(device_type),)


def input_key(args: tuple, kwargs: dict) -> tuple:
    """The inputs' signature, or :class:`CudaGraphError` for inputs a graph cannot take."""
    if kwargs:
        raise CudaGraphError(
            f"FracConfig.cuda_graphs = True: a graphed training step takes positional tensors "
            f"only, this call passes keyword argument(s) {', '.join(sorted(kwargs))}; pass them "
            f"by position, or {OFF_HINT}"
        )
    if not args:
        raise CudaGraphError(f"FracConfig.cuda_graphs = True: the call has no tensor input; {OFF_HINT}")
    out = []
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise CudaGraphError(
                f"FracConfig.cuda_graphs = True: input {i} is a {type(a).__name__}, and a graphed "
                f"training step takes tensors only; {OFF_HINT}"
            )
        if not _is_cuda(a):
            raise CudaGraphError(
                f"FracConfig.cuda_graphs = True captures training steps on CUDA tensors, and input "
                f"{i} is on {a.device}: move the model and its inputs to a GPU (model.cuda()), or "
                f"{OFF_HINT}"
            )
        out.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad))
    return (*out, autocast_key(args[0].device.type))


# -- capture ----------------------------------------------------------------------------------------
class _Step(nn.Module):
    """What is handed to make_graphed_callables: the model's own (ungraphed) forward. A wrapper,
    so that the model keeps its forward and its hooks (make_graphed_callables replaces the
    forward of the module it is given and refuses modules with hooks)."""

    def __init__(self, model: nn.Module, eager: Callable):
        super().__init__()
        self.model = model
        self.eager = eager

    def forward(self, *args):
        return self.eager(self.model, *args)


def _make_graphed(step: nn.Module, sample_args: tuple) -> Callable:
    """The graphed callable of ``step`` (tests replace this: there is no GPU in CI)."""
    graphed = torch.cuda.make_graphed_callables(
        step, sample_args, num_warmup_iters=WARMUP_ITERS, allow_unused_input=True
    )
    return graphed.forward


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``t`` (same strides): the graph's own input buffer, into which every
    replay copies its inputs (the caller's tensor is never written)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out.requires_grad_(t.requires_grad)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class CudaGraphs:
    """The graphs of one compiled model and their bookkeeping (``fmodel.cuda_graphs``).

    ``captures``, ``replays``: counts since the model was compiled; ``invalidations``: why graphs
    were dropped, latest last (at most 16 kept)."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[tuple, Callable] = OrderedDict()
        self.generation: tuple | None = None  # (precisions, parameters and buffers) of the graphs
        self.captures = 0
        self.replays = 0
        self.invalidations: list[str] = []
        self._warned = False

    # graphs hold GPU memory and CUDA objects: copies and pickles of a model start without any
    def __deepcopy__(self, memo) -> CudaGraphs:
        return CudaGraphs()

    def __reduce__(self):
        return (CudaGraphs, ())

    def __repr__(self) -> str:
        return f"CudaGraphs({len(self.graphs)} graph(s), {self.captures} captures, {self.replays} replays)"

    def invalidate(self, why: str) -> None:
        """Drop every graph (the next training step captures again)."""
        if self.graphs:
            self.invalidations = [*self.invalidations[-15:], why]
        self.graphs.clear()
        self.generation = None

    def __call__(self, model: nn.Module, eager: Callable, args: tuple, kwargs: dict[str, Any]):
        """``model(*args)`` in training mode with autograd on: replay the graph of this signature,
        capturing it first if there is none. ``eager(model, *args)`` is the ungraphed forward."""
        inputs = input_key(args, kwargs)
        generation = (precision_key(model), state_key(model))
        if generation != self.generation:
            if self.generation is not None:
                changed = (
                    "precision"
                    if generation[0] != self.generation[0]
                    else "parameters, buffers or submodule modes"
                )
                self.invalidate(f"the {changed} changed")
            self.generation = generation
        graphed = self.graphs.get(inputs)
        if graphed is None:
            graphed = self._capture(model, eager, args)
            self.graphs[inputs] = graphed
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(inputs)
            self.replays += 1
        return graphed(*args)

    def _capture(self, model: nn.Module, eager: Callable, args: tuple) -> Callable:
        buffers = list(model.buffers())
        kept = [b.detach().clone() for b in buffers]  # the warm-up steps change them
        step = _Step(model, eager)
        try:
            graphed = _make_graphed(step, tuple(_static_copy(a) for a in args))
        except CudaGraphError:
            raise
        except Exception as err:  # noqa: BLE001 - any capture failure gets the same advice
            raise CudaGraphError(
                f"FracConfig.cuda_graphs = True: capturing the training step of "
                f"{type(model).__name__} (forward and backward) in a CUDA graph failed "
                f"({_first_line(err)}). Most likely an op of the step reads a GPU value on the "
                f"host (a host sync such as .item() or bool(tensor): docs/cuda.md lists those "
                f"left on each backend), which a CUDA graph cannot hold; {OFF_HINT}. Start a new "
                f"process for that: a failed capture can leave this one's CUDA state unusable"
            ) from err
        finally:
            with torch.no_grad():
                for b, k in zip(buffers, kept):
                    b.copy_(k)
        self.captures += 1
        self._check_churn()
        return graphed

    def _check_churn(self) -> None:
        if self._warned or self.captures < CHURN_WARN_AFTER or self.replays >= 4 * self.captures:
            return
        self._warned = True
        latest = self.invalidations[-1] if self.invalidations else "new input shapes"
        warnings.warn(
            f"FracConfig.cuda_graphs: {self.captures} captures for {self.replays} replays (latest "
            f"reason: {latest}); each capture runs {WARMUP_ITERS} warm-up steps, so graphs cost "
            "more than they save when precisions or shapes change this often (a cyclic schedule, "
            "varying batch shapes): consider cuda_graphs=False",
            stacklevel=4,
        )
