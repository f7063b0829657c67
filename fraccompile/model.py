"""FracModel: the compiled module. A ``torch.fx.GraphModule`` whose graph contains the sites,
precision-control nodes and (later) gates, plus views of them for people and tools."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, replace

import torch
from torch import fx

from .config import FracConfig
from .control.controller import PrecisionController
from .cost import CP_SCOPES, CostMeter, CostReport, cost_report, mixed_site_cost, site_cost
from .meta_keys import GM_FP32_OPS, META_FP_LAYER, META_GATE, META_PRECISION_NODE, META_SITE, META_SITE_PARTS
from .ops.backend import CHANNELS_LAST, capabilities
from .ops.modules import FracOp
from .ops.spec import Precision
from .passes.base import SiteInfo
from .passes.coverage import Fp32Op
from .passes.quantize_insertion import PRECISION_MODULE, SITES_MODULE

EVAL_GRAPH = "_frac_eval"  # instance attribute: the GraphModule that runs in eval mode, if any
CUDA_GRAPHS = "_frac_cuda_graphs"  # instance attribute: the CudaGraphs of cuda_graphs=True, if any


@dataclass(frozen=True)
class Site:
    """A read-only view of one site with its current precision."""

    name: str
    kind: str
    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    precision: Precision
    full_precision: bool
    backend: str
    fallback_reason: str | None
    module_path: str
    source: str
    calls: int
    epilogue: str = ""  # what the tvm backend fused after the op, e.g. "BatchNorm2d+relu"


class FracModel(fx.GraphModule):
    """The result of :func:`fraccompile.compile`: an ``nn.Module`` that trains with FracTrain
    semantics. Its parameters are the original model's (shared, not copied).

    * ``.precision`` — the :class:`PrecisionController` every site reads at run time;
    * ``.sites`` — the sites (and the layers kept in full precision) with MACs and precisions;
    * ``.cost()`` — the paper's FW/EB/GC bit-cost of one training step;
    * ``.code`` — the transformed forward as Python source.
    """

    frac_config: FracConfig
    frac_schedule = None  # set by use_schedule
    frac_iteration = 0  # training iterations counted by frac_step

    @property
    def precision(self) -> PrecisionController:
        return self.get_submodule(PRECISION_MODULE).controller

    @property
    def fp32_memory_format(self) -> torch.memory_format:
        """The memory format this model's fp32 convs run in: ``torch.channels_last`` where its
        backend's conv sites read and write channels-last (``tvm``; ``auto`` where it picks tvm: the
        channels-last pass then converts the convs kept in fp32), else ``torch.contiguous_format``.
        At precision 0 the compiled model computes bit for bit what the original computes in this
        format: ``model.to(memory_format=f)`` on an input ``x.contiguous(memory_format=f)``."""
        if CHANNELS_LAST in capabilities(self.frac_config):
            return torch.channels_last
        return torch.contiguous_format

    def _infos(self) -> list[SiteInfo]:
        return _site_infos(self.graph)

    # -- eval mode on a graph captured in eval mode (export path) ---------------------------------
    def attach_eval_graph(self, eval_gm: fx.GraphModule) -> str | None:
        """Run ``eval_gm`` (the model captured in eval mode, through the same passes) whenever
        this model is in eval mode. It shares this model's parameters, buffers, site modules,
        precision controller and gates. Returns why it cannot (its sites differ), else None."""

        def key(i):
            return (i.name, i.kind, i.op, i.weight_shape, i.full_precision, i.extra.get("epilogue", ""))

        mine, theirs = [key(i) for i in self._infos()], [key(i) for i in _site_infos(eval_gm.graph)]
        if mine != theirs:
            return f" (its sites differ: {sorted(set(theirs) ^ set(mine))[:3]})"
        shared = [PRECISION_MODULE, "frac_gates"]
        if hasattr(eval_gm, SITES_MODULE):
            shared += [f"{SITES_MODULE}.{n}" for n, _ in eval_gm.get_submodule(SITES_MODULE).named_children()]
        for path in shared:
            if not hasattr(eval_gm, path.split(".")[0]):
                continue
            try:
                mod = self.get_submodule(path)
            except AttributeError:
                return f" (no {path} to share)"
            if type(mod) is not type(eval_gm.get_submodule(path)):
                return f" ({path} differs)"
            parent, _, leaf = path.rpartition(".")
            setattr(eval_gm.get_submodule(parent) if parent else eval_gm, leaf, mod)
        own = {id(m) for m in self.modules()}
        for m in eval_gm.modules():
            if id(m) not in own:
                m.training = False
        self.__dict__[EVAL_GRAPH] = eval_gm
        _share_state(self, eval_gm)
        self.recompile()
        return None

    def recompile(self):
        result = super().recompile()
        if self.__dict__.get(EVAL_GRAPH) is not None or self.__dict__.get(CUDA_GRAPHS) is not None:
            cls = type(self)
            graph_forward = cls.forward

            @functools.wraps(graph_forward)
            def forward(self, *args, **kwargs):
                if not self.training:
                    eval_gm = self.__dict__.get(EVAL_GRAPH)
                    if eval_gm is not None:
                        return eval_gm(*args, **kwargs)
                else:
                    graphs = self.__dict__.get(CUDA_GRAPHS)
                    if graphs is not None and torch.is_grad_enabled():
                        return graphs(self, graph_forward, args, kwargs)
                return graph_forward(self, *args, **kwargs)

            cls.forward = forward
        return result

    # -- CUDA graphs (FracConfig.cuda_graphs) -----------------------------------------------------
    def enable_cuda_graphs(self) -> None:
        """Graph this model's training steps on CUDA tensors (:mod:`fraccompile.cuda_graphs`);
        :func:`fraccompile.compile` calls it for ``FracConfig(cuda_graphs=True)``. Raises
        ``ConfigError`` for a model whose step can never be graphed (DFQ gates)."""
        from .cuda_graphs import CudaGraphs, refusal_reason
        from .errors import ConfigError

        why = refusal_reason(self)
        if why is not None:
            raise ConfigError(f"FracConfig.cuda_graphs = True cannot graph this model: {why}")
        self.__dict__[CUDA_GRAPHS] = CudaGraphs()
        self.recompile()

    @property
    def cuda_graphs(self):
        """The model's :class:`~fraccompile.cuda_graphs.CudaGraphs` (captures, replays, why graphs
        were dropped), or None without ``FracConfig(cuda_graphs=True)``."""
        return self.__dict__.get(CUDA_GRAPHS)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.__dict__.get(EVAL_GRAPH) is not None:
            _share_state(self, self.__dict__[EVAL_GRAPH])
        return result

    @property
    def fp32_ops(self) -> list[Fp32Op]:
        """Every GEMM-like op that runs in fp32 and why (layers kept by the config, ops no site
        takes, GEMMs inside opaque leaf modules or functions): the coverage table."""
        return list(self.meta.get(GM_FP32_OPS, []))

    @property
    def sites(self) -> list[Site]:
        """Every quantizable op in graph order; ``full_precision`` ones are not quantized."""
        ctrl = self.precision
        ops = {m.site: m for m in self.modules() if isinstance(m, FracOp)}
        out = []
        for i in self._infos():
            prec = Precision() if i.full_precision else ctrl[i.name]
            backend, reason = "torch", None
            if not i.full_precision:
                backend, reason = (
                    ops[i.name].kernel_status(prec) if i.name in ops else (i.backend, i.fallback_reason)
                )
            out.append(
                Site(
                    i.name,
                    i.kind,
                    i.op,
                    i.input_shape,
                    i.weight_shape,
                    i.output_shape,
                    i.macs,
                    prec,
                    i.full_precision,
                    backend,
                    reason,
                    i.module_path,
                    i.source,
                    i.calls,
                    i.extra.get("epilogue", ""),
                )
            )
        return out

    def cost(self) -> CostReport:
        """FW/EB/GC bit-cost of one training step at the captured batch size, per site and total
        (layers kept in full precision included at 32 bits). Gated (DFQ) sites count at the
        candidates chosen in the latest forward, weighted by their share of the batch."""
        bank, regions = self._gates(), self._site_regions()
        rows = []
        for s in self.sites:
            region = regions.get(s.name)
            if bank is not None and region in bank.last:
                shares = bank.fractions(region).detach().tolist()
                mixture = [(f, (a, s.precision.w, g)) for f, a, g in zip(shares, bank.a, bank.g)]
                rows.append(mixed_site_cost(s.name, s.macs, mixture))
            else:
                rows.append(site_cost(s.name, s.macs, s.precision, s.full_precision))
        return CostReport(tuple(rows))

    def gate_cp(self, scope: str = "model") -> torch.Tensor:
        """The expected cost ratio ``cp`` of the latest forward as a differentiable function of the
        gates' decisions (straight-through), for the DFQ cost regularizer.

        ``scope="model"``: against fp32 training of the whole model, the sites no gate feeds (the
        fp32 first and last layers, say) counted at their precision. ``scope="gated"``: against
        fp32 training of the gated sites alone, as FracTrain's code counts its ``cp`` (so its
        targets, e.g. 1.5%, mean the same here)."""
        if scope not in CP_SCOPES:
            raise ValueError(f"gate_cp scope {scope!r}: choose {' or '.join(CP_SCOPES)}")
        bank, regions = self._gates(), self._site_regions()
        if bank is None or not bank.last:
            raise RuntimeError("gate_cp() needs a model compiled with pipeline='dfq' and a forward")
        total, fixed = 0.0, 0.0
        terms = []
        for s in self.sites:
            region = regions.get(s.name)
            gated = region in bank.last
            if not gated and scope == "gated":
                continue
            total += 3 * s.macs
            if gated:
                w = s.precision.w or 32
                per_candidate = torch.tensor([(a * w + g * w + a * g) / 1024 for a, g in zip(bank.a, bank.g)])
                terms.append(s.macs * (bank.fractions(region) * per_candidate).sum())
            else:
                fixed += site_cost(s.name, s.macs, s.precision).total
        if not terms:
            raise RuntimeError("gate_cp() found no gated site in the latest forward")
        return (sum(terms) + fixed) / total

    def _gates(self):
        return getattr(self, "frac_gates", None)

    def _site_regions(self) -> dict[str, str]:
        """site -> region of the gate feeding its precision node (DFQ), from the graph. Cached:
        cost() runs every training step and the graph does not change after compile."""
        key = (id(self.graph), len(self.graph.nodes))
        cached = self.__dict__.get("_site_regions_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        out = {}
        for node in self.graph.nodes:
            site = node.meta.get(META_PRECISION_NODE)
            if site is not None and len(node.args) > 1 and node.args[1] is not None:
                out[site] = node.args[1].meta[META_GATE]
        self.__dict__["_site_regions_cache"] = (key, out)
        return out

    def sbm_cost(self) -> CostReport:
        """Cost of one step of static 8/8/8 training (FracTrain's SBM baseline) of this model."""
        sbm = Precision(8, 8, 8)
        return cost_report(
            (s.name, s.macs, Precision() if s.full_precision else sbm, s.full_precision) for s in self.sites
        )

    # -- training-time hooks ----------------------------------------------------------------------
    @property
    def frac_meter(self) -> CostMeter:
        if "_frac_meter" not in self.__dict__:
            self.__dict__["_frac_meter"] = CostMeter()
        return self.__dict__["_frac_meter"]

    def use_schedule(self, schedule) -> FracModel:
        """Let ``schedule`` (see :mod:`fraccompile.control.schedules`) drive the precisions; it is
        applied now for iteration ``frac_iteration``."""
        if not (hasattr(schedule, "apply") and hasattr(schedule, "observe")):
            raise TypeError(
                f"{type(schedule).__name__} is not a schedule: it needs "
                "apply(controller, iteration) and observe(iteration, loss)"
            )
        self.frac_schedule = schedule
        schedule.apply(self.precision, self.frac_iteration)
        return self

    def frac_step(self, loss) -> list[dict]:
        """Call once per training iteration, after the step: counts the step's bit-cost at the
        precision it ran with, feeds the loss to the schedule and applies the schedule for the next
        iteration. Returns the schedule's events (e.g. PFQ turning points)."""
        self.frac_meter.add(self.cost(), self._sbm_cost())
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().item()
        events: list[dict] = []
        if self.frac_schedule is not None:
            events = self.frac_schedule.observe(self.frac_iteration, float(loss))
        self.frac_iteration += 1
        if self.frac_schedule is not None:
            self.frac_schedule.apply(self.precision, self.frac_iteration)
        return events

    def _sbm_cost(self) -> CostReport:
        cached = self.__dict__.get("_sbm_cost_cache")
        if cached is None:
            cached = self.__dict__["_sbm_cost_cache"] = self.sbm_cost()
        return cached

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.__class__.__name__ = type(self).__name__
        res.frac_config = replace(self.frac_config)
        res.frac_schedule = copy.deepcopy(self.frac_schedule, memo)
        res.frac_iteration = self.frac_iteration
        res.frac_meter.load_state_dict(self.frac_meter.state_dict())
        if self.__dict__.get(EVAL_GRAPH) is not None:
            eval_gm = copy.deepcopy(self.__dict__[EVAL_GRAPH], memo)
            res.__dict__[EVAL_GRAPH] = eval_gm
            _share_state(res, eval_gm)
            res.recompile()
        if self.__dict__.get(CUDA_GRAPHS) is not None:  # a fresh one: graphs are not copied
            res.enable_cuda_graphs()
        return res


def _site_infos(graph: fx.Graph) -> list[SiteInfo]:
    seen: dict[str, SiteInfo] = {}
    for node in graph.nodes:
        info = node.meta.get(META_SITE) or node.meta.get(META_FP_LAYER)
        infos = [info] if info is not None else [i for i, _ in node.meta.get(META_SITE_PARTS, [])]
        for info in infos:
            seen.setdefault(info.name, info)
    return list(seen.values())


def _share_state(frac: torch.nn.Module, eval_gm: torch.nn.Module) -> None:
    """Point ``eval_gm``'s parameters and buffers at ``frac``'s of the same name (after ``.to()``
    replaced ``frac``'s buffers, for instance)."""
    have = dict(frac.named_parameters(remove_duplicate=False))
    have.update(frac.named_buffers(remove_duplicate=False))
    for mod_path, mod in eval_gm.named_modules(remove_duplicate=False):
        for table in (mod._parameters, mod._buffers):
            for name, value in table.items():
                mine = have.get(f"{mod_path}.{name}" if mod_path else name)
                if mine is not None and mine is not value and type(mine) is type(value):
                    table[name] = mine
