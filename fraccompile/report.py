"""Human- and machine-readable views of a compiled model: the site table, graph.json, report.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from .meta_keys import (
    GM_CAPTURE,
    GM_MODE_MERGE,
    GM_REGIONS,
    GM_STATIC_DIMS,
    META_FP_LAYER,
    META_PRECISION_NODE,
    META_SITE,
)
from .model import FracModel
from .passes.base import node_shape

_HEADERS = ("site", "op", "input", "weight", "output", "MACs", "a/w/g", "backend")


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s)) if s else "-"


def site_rows(fm: FracModel) -> list[tuple[str, ...]]:
    rows = []
    for s in fm.sites:
        backend = "fp32 (config)" if s.full_precision else s.backend
        if s.fallback_reason:
            backend += f" ({s.fallback_reason})"
        op = f"{s.op} + {s.epilogue}" if s.epilogue else s.op
        rows.append(
            (
                s.name,
                op,
                _shape(s.input_shape),
                _shape(s.weight_shape),
                _shape(s.output_shape),
                f"{s.macs:,}",
                str(s.precision),
                backend,
            )
        )
    return rows


def sites_table(fm: FracModel, title: str | None = None) -> Table:
    table = Table(title=title)
    for h in _HEADERS:
        table.add_column(h, justify="right" if h == "MACs" else "left")
    for row in site_rows(fm):
        table.add_row(*row)
    return table


def sites_markdown(fm: FracModel) -> str:
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in site_rows(fm)]
    return "\n".join(lines)


_COVERAGE_HEADERS = ("node", "op", "module", "left in fp32 because")


def coverage_rows(fm: FracModel) -> list[tuple[str, ...]]:
    """Every GEMM-like op left in fp32 and why (``fm.fp32_ops``), plus one row per capture note
    (static input dimensions, modules whose eval-mode graph could not be merged)."""
    rows = [(o.node, o.op, o.module_path or "-", o.reason) for o in fm.fp32_ops]
    rows += [("-", "shape", "-", line) for line in fm.meta.get(GM_STATIC_DIMS, [])]
    rows += [
        ("-", "train/eval", p, "eval-mode graph differs structurally: runs the train-mode graph")
        for p in fm.meta.get(GM_MODE_MERGE, [])
    ]
    return rows


def coverage_table(fm: FracModel) -> Table:
    """The coverage table for the console (``fraccompile transform`` prints it)."""
    table = Table(title=f"GEMM-like ops left in fp32: {len(fm.fp32_ops)}")
    for h in _COVERAGE_HEADERS:
        table.add_column(h)
    for row in coverage_rows(fm):
        table.add_row(*row)
    return table


def coverage_markdown(fm: FracModel) -> str:
    """The coverage table as a list (report.md keeps one table: the sites'): one line per op."""
    rows = coverage_rows(fm)
    if not rows:
        return "None: every GEMM-like op is a quantized site."
    return "\n".join(f"- `{node}` ({op}, module `{module}`): {reason}" for node, op, module, reason in rows)


def regions_markdown(fm: FracModel) -> str:
    """The DFQ regions and their gates (empty without the dfq pipeline)."""
    regions = fm.meta.get(GM_REGIONS) or []
    if not regions:
        return ""
    lines = ["## DFQ gates\n", "| region | kind | gate input | sites | skippable |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.kind} | {r.entry} | {', '.join(r.sites)} | {r.skippable} |" for r in regions]
    return "\n".join(lines) + "\n\n"


def graph_dict(fm: FracModel) -> dict:
    """Nodes, edges and sites of the transformed graph (JSON-serializable)."""
    nodes, edges = [], []
    for node in fm.graph.nodes:
        entry = {
            "name": node.name,
            "op": node.op,
            "target": _target_name(node.target),
            "shape": list(node_shape(node) or []),
        }
        if META_SITE in node.meta:
            entry["site"] = node.meta[META_SITE].name
        if META_FP_LAYER in node.meta:
            entry["full_precision_layer"] = node.meta[META_FP_LAYER].name
        if META_PRECISION_NODE in node.meta:
            entry["precision_for"] = node.meta[META_PRECISION_NODE]
        nodes.append(entry)
        edges += [[src.name, node.name] for src in node.all_input_nodes]
    sites = [asdict(s) | {"precision": list(s.precision)} for s in fm.sites]
    regions = [asdict(r) for r in fm.meta.get(GM_REGIONS, [])]
    return {
        "capture": fm.meta.get(GM_CAPTURE),
        "config": fm.frac_config.to_dict(),
        "nodes": nodes,
        "edges": edges,
        "sites": sites,
        "regions": regions,
        "fp32_ops": [asdict(o) for o in fm.fp32_ops],
        "cost": fm.cost().to_dict(),
    }


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def write_transform_outputs(fm: FracModel, out_dir: str | Path, source: str) -> list[Path]:
    """Write ``transformed.py``, ``graph.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = (
        f'"""Transformed forward of {source}, generated by fraccompile.\n\n'
        "Each `prec_*` line is a precision-control node: it reads the site's (a, w, g) from the\n"
        "model's PrecisionController at run time; the call after it is the FracOp site.\n"
        '"""\n' + fm.code
    )
    paths = [out / "transformed.py", out / "graph.json", out / "report.md"]
    paths[0].write_text(code)
    paths[1].write_text(json.dumps(graph_dict(fm), indent=1, default=str))
    cost = fm.cost()
    n_sites = sum(not s.full_precision for s in fm.sites)
    paths[2].write_text(
        f"# fraccompile transform: {source}\n\n"
        f"Captured with torch.{fm.meta.get(GM_CAPTURE)}; {n_sites} sites, "
        f"{len(fm.sites) - n_sites} layers kept in full precision.\n\n"
        f"{sites_markdown(fm)}\n\n## GEMM-like ops left in fp32\n\n{coverage_markdown(fm)}\n\n"
        f"{regions_markdown(fm)}## Cost of one training step\n\n"
        f"{cost.summary()}\n"
    )
    return paths
