"""Plots and markdown summaries of a training run's ``log.jsonl``.

The run log's schema, its writer and its reader (:func:`read_log`, :class:`RunLog`) live in
:mod:`fraccompile.runlog`; this module draws from what the reader returns. Costs are in fp32-MAC
units; the plots and tables show them in "fp32 training steps" (``cum / start.cost_per_step.fp32``).
DFQ/FracTrain runs (periods with ``gates``) also get ``gates.png`` and a per-region table, and
classification runs among them (``gate_classes``) ``gates_by_class.png`` and a per-class table.

Figures are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so
rendering touches no global matplotlib state and works without a display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runlog import LOG_NAME, LogError, RunLog, read_log  # noqa: F401  (the reader)

FULL_BITS = 32  # a precision of 0 (or a missing one) means full precision
_DPI = 120


def _bits(prec: dict | None, key: str) -> float:
    v = (prec or {}).get(key)
    return v if v else FULL_BITS


def _awg(prec: dict | None) -> str:
    """``a/w/g`` bits, e.g. ``4/4/6``; DFQ's share-weighted mean bits print as ``4.37``."""
    return "/".join(f"{_bits(prec, k):.4g}" for k in "awg")


def _tp_change(tp: dict) -> str:
    """What a turning point switched to: ``4/4/6`` (PFQ) or ``cp 2.00%`` (FracTrain's target)."""
    if tp.get("target_cp") is not None and tp.get("precision") is None:
        return f"cp {100 * tp['target_cp']:.2f}%"
    return _awg(tp.get("precision"))


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def _cost_unit(log: RunLog) -> str:
    return "fp32 training steps" if log.fp32_step else "fp32-MAC units"


def _new_figure(nrows: int = 1, height: float = 4.5) -> tuple[Figure, list]:
    fig = Figure(figsize=(9, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _mark_events(ax, log: RunLog, text: bool = False) -> None:
    """Vertical lines at turning points (labelled when ``text``) and resumes."""
    for tp in log.turning_points:
        ax.axvline(tp["iter"], color="tab:red", ls="--", lw=0.9, alpha=0.7)
        if text:
            ax.annotate(
                f"TP{tp.get('index', '')}: {_tp_change(tp)}",
                (tp["iter"], 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -4),
                textcoords="offset points",
                va="top",
                rotation=90,
                fontsize=8,
                color="tab:red",
            )
    for r in log.resumes:
        ax.axvline(r["iter"], color="gray", ls=":", lw=0.9)


def _plot_curves(log: RunLog, out: Path) -> None:
    fig, (ax_loss, ax_acc) = _new_figure(2, 6)
    ps = log.periods
    ax_loss.plot([p["iter"] for p in ps], [_num(p.get("train_loss")) for p in ps], label="train loss")
    test = [(p["iter"], p["test_loss"]) for p in ps if p.get("test_loss") is not None]
    if test:
        ax_loss.plot(*zip(*test), "o-", ms=3, label="test loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{log.start.get('model', '?')} - {log.schedule}", fontsize=10)
    for key, name in (("train_acc", "train acc"), ("test_acc", "test acc")):
        pts = [(p["iter"], 100 * p[key]) for p in ps if p.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), "o-" if key == "test_acc" else "-", ms=3, label=name)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_xlabel("iteration")
    for ax in (ax_loss, ax_acc):
        _mark_events(ax, log)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.savefig(out)


def _plot_precision(log: RunLog, out: Path) -> None:
    # (iter, precision) from the periods and turning points; a turning point sorts after a period
    # at the same iteration since it is the switch. Cyclic schedules are only sampled per period.
    # FracTrain's turning points change the cost target, not the precision: they are no points.
    pts = sorted(
        [(p["iter"], 0, p.get("precision")) for p in log.periods]
        + [
            (t["iter"], 1, t.get("precision"))
            for t in log.turning_points
            if t.get("precision") is not None or t.get("target_cp") is None
        ],
        key=lambda x: x[:2],
    )
    fig, (ax,) = _new_figure()
    if pts:
        xs = [x for x, _, _ in pts] + [max(log.last_iter, pts[-1][0])]
        for key, name, style in (
            ("a", "a (activations)", "-"),
            ("w", "w (weights)", "--"),
            ("g", "g (gradients)", "-"),
        ):
            ys = [_bits(p, key) for _, _, p in pts]
            ax.step(xs, ys + ys[-1:], where="post", ls=style, lw=1.8, label=name)
    _mark_events(ax, log, text=True)
    ax.set_xlabel("iteration")
    ax.set_ylabel("bits (32 = full precision)")
    ax.set_title(f"Precision schedule - {log.schedule}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out)


def _plot_cost(log: RunLog, out: Path) -> None:
    fig, (ax,) = _new_figure()
    # fp32 usually dwarfs low-precision runs: then a log scale keeps this run and SBM readable
    finals = [log.cum(k) or 0.0 for k in ("cum_cost", "cum_sbm", "cum_fp32")]
    log_y = finals[2] > 10 * max(finals[:2]) > 0
    xs = ([] if log_y else [0]) + [p["iter"] for p in log.periods]
    for key, name, style in (
        ("cum_cost", "this run", "-"),
        ("cum_sbm", "SBM (static 8/8/8)", ":"),
        ("cum_fp32", "fp32", "--"),
    ):
        ys = ([] if log_y else [0.0]) + [_num(log.in_steps(p.get(key))) for p in log.periods]
        ax.plot(xs, ys, ls=style, lw=2 if key == "cum_cost" else 1.3, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"cumulative bit-cost ({_cost_unit(log)}{', log scale' if log_y else ''})")
    ax.set_title(
        f"Training cost - saving {_fmt(log.saving('fp32'), '.1f', '%')} vs fp32, "
        f"{_fmt(log.saving('sbm'), '.1f', '%')} vs SBM",
        fontsize=10,
    )
    _mark_events(ax, log)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(out)


@dataclass
class GateStats:
    """The gates' choices of a DFQ run: candidates ``(a, g)`` in increasing order, regions in log
    order, and per region the candidate shares averaged over the run (each period weighted by its
    iterations) plus per gated period (``iters``) its mean activation bits (NaN if not logged)."""

    candidates: list[tuple[float, float]]
    regions: list[str]
    shares: dict[str, list[float]]
    iters: list[int]
    a_bits: dict[str, list[float]]

    def mean_bits(self, region: str) -> tuple[float, float]:
        """Share-weighted mean (a, g) bits of ``region`` over the run."""
        sh = self.shares[region]
        return (
            sum(s * a for s, (a, _) in zip(sh, self.candidates)),
            sum(s * g for s, (_, g) in zip(sh, self.candidates)),
        )


def gate_stats(log: RunLog) -> GateStats | None:
    """Per-region gate statistics of a run, or ``None`` when no period logs usable ``gates``.

    A period without ``gate_candidates`` uses the latest ones logged before it; a region whose
    share list does not match the candidates is left out of that period.
    """
    cols: list[tuple[int, int, dict[str, dict[tuple, float]]]] = []
    prev, cands = 0, None
    for p in log.periods:
        weight, prev = max(p["iter"] - prev, 1), p["iter"]
        if isinstance(p.get("gate_candidates"), list) and p["gate_candidates"]:
            cands = [tuple(c) for c in p["gate_candidates"]]
        gates = p.get("gates")
        if not isinstance(gates, dict) or not cands:
            continue
        col = {
            str(r): {c: float(s or 0.0) for c, s in zip(cands, sh)}
            for r, sh in gates.items()
            if isinstance(sh, list) and len(sh) == len(cands)
        }
        if col:
            cols.append((p["iter"], weight, col))
    if not cols:
        return None
    regions = list(dict.fromkeys(r for _, _, col in cols for r in col))
    candidates = sorted({c for _, _, col in cols for sh in col.values() for c in sh})
    shares, a_bits = {}, {}
    for r in regions:
        present = [(w, col[r]) for _, w, col in cols if r in col]
        total = sum(w for w, _ in present)
        shares[r] = [sum(w * sh.get(c, 0.0) for w, sh in present) / total for c in candidates]
        a_bits[r] = [sum(s * c[0] for c, s in col[r].items()) if r in col else math.nan for _, _, col in cols]
    return GateStats(candidates, regions, shares, [i for i, _, _ in cols], a_bits)


def gate_class_bits(log: RunLog, stats: GateStats) -> dict[str, list[float]] | None:
    """Per region, the mean activation bits its gate chose for the samples of each class, over
    the whole run (from ``gate_classes``), or ``None`` when the run logs none."""
    totals: dict[str, np.ndarray] = {}
    cands = None
    for p in log.periods:
        if isinstance(p.get("gate_candidates"), list) and p["gate_candidates"]:
            cands = [tuple(c) for c in p["gate_candidates"]]
        counts = p.get("gate_classes")
        if not isinstance(counts, dict) or not cands:
            continue
        for r, table in counts.items():
            arr = np.asarray(table, dtype=float)
            if arr.ndim != 2 or arr.shape[1] != len(cands):
                continue
            # columns in the order of stats.candidates (sorted), whatever the logged order
            arr = arr[:, [cands.index(c) for c in stats.candidates if c in cands]]
            if r in totals and totals[r].shape == arr.shape:
                totals[r] += arr
            elif r not in totals:
                totals[r] = arr
    if not totals:
        return None
    a = np.array([c[0] for c in stats.candidates], dtype=float)
    out = {}
    for r in [r for r in stats.regions if r in totals]:
        n = totals[r].sum(1)
        out[r] = [float(v) for v in np.where(n > 0, totals[r] @ a / np.maximum(n, 1), np.nan)]
    return out


def _plot_gates_by_class(log: RunLog, stats: GateStats, bits: dict[str, list[float]], out: Path) -> None:
    regions = list(bits)
    n_cls = max(len(v) for v in bits.values())
    data = np.ma.masked_invalid(
        np.array([bits[r] + [math.nan] * (n_cls - len(bits[r])) for r in regions], dtype=float)
    )
    lo = min(c[0] for c in stats.candidates)
    hi = max(c[0] for c in stats.candidates)
    fig = Figure(
        figsize=(max(5.0, 0.45 * n_cls + 3.5), max(2.5, 0.3 * len(regions) + 1.5)),
        dpi=_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = _bits_heatmap(
        ax, data, lo, hi, [bits[r] for r in regions] if n_cls <= 16 and len(regions) <= 24 else []
    )
    ax.set_xticks(range(n_cls), [str(c) for c in range(n_cls)], fontsize=8)
    ax.set_yticks(range(len(regions)), [_short(r) for r in regions], fontsize=8 if len(regions) <= 24 else 6)
    ax.set_xlabel("class")
    ax.set_ylabel("region")
    ax.set_title(f"Mean activation bits chosen per class - {log.schedule}", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean a bits", fraction=0.05, pad=0.02)
    fig.savefig(out)


def _bits_heatmap(ax, data, lo: float, hi: float, labels: list[list[float]]):
    """Mean bits (``data``, rows by columns, NaN masked) as a heat map from ``lo`` to ``hi`` bits;
    each finite value of ``labels`` (the same rows, or none) is written in its cell."""
    im = ax.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        cmap=colormaps["YlGnBu"].with_extremes(bad="lightgray"),
        vmin=lo,
        vmax=hi if hi > lo else lo + 1,
    )
    for i, row in enumerate(labels):
        for j, v in enumerate(row):
            if not math.isnan(v):
                dark = (v - lo) / ((hi - lo) or 1) > 0.55
                ax.text(
                    j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    return im


def _short(name: str, n: int = 24) -> str:
    """``name`` cut in the middle to at most ``n`` characters (both ends tell regions apart)."""
    return name if len(name) <= n else name[: n // 2 - 1] + "\u2026" + name[-(n - n // 2) :]


def _plot_gates(log: RunLog, stats: GateStats, out: Path) -> None:
    regions, cands = stats.regions, stats.candidates
    n_reg, n_col = len(regions), len(stats.iters)
    h_heat = max(2.2, 0.28 * n_reg + 1.3)
    fig = Figure(figsize=(9, min(3.6 + h_heat, 12.0)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax_heat = fig.subplots(2, 1, height_ratios=[3.6, h_heat])
    cmap = colormaps["YlGnBu"]

    # (1) candidate shares per region over the whole run, low precision (light) at the bottom
    x = np.arange(n_reg)
    bottom = np.zeros(n_reg)
    colours = cmap(np.linspace(0.2, 0.95, len(cands)))
    for k, (c, colour) in enumerate(zip(cands, colours)):
        vals = np.array([100.0 * stats.shares[r][k] for r in regions])
        ax_bar.bar(
            x,
            vals,
            0.75,
            bottom=bottom,
            color=colour,
            edgecolor="white",
            lw=0.5,
            label=f"a/g = {c[0]:g}/{c[1]:g}",
        )
        if n_reg <= 12:
            for xi, v, b in zip(x, vals, bottom):
                if v >= 8:
                    ax_bar.text(
                        xi,
                        b + v / 2,
                        f"{v:.0f}%",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if k >= len(cands) / 2 else "black",
                    )
        bottom += vals
    rotate = n_reg > 6 or max(len(r) for r in regions) > 10
    ax_bar.set_xticks(
        x,
        [_short(r) for r in regions],
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        fontsize=8 if n_reg <= 24 else 6,
    )
    ax_bar.set_xlim(-0.6, n_reg - 0.4)
    ax_bar.set_ylim(0, 100)
    ax_bar.set_ylabel("share of samples (%)")
    fig.suptitle(f"Precision chosen by the gates per region - {log.schedule}", fontsize=10)
    ax_bar.legend(
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=min(len(cands), 6),
        fontsize=8,
        frameon=False,
        title_fontsize=9,
        title=f"candidate shares, averaged over iterations 1-{stats.iters[-1]}",
    )
    ax_bar.grid(axis="y", alpha=0.3)

    # (2) mean activation bits per region (rows) and period (columns)
    lo, hi = min(c[0] for c in cands), max(c[0] for c in cands)
    data = np.ma.masked_invalid(np.array([stats.a_bits[r] for r in regions], dtype=float))
    labelled = n_col <= 16 and n_reg <= 16
    im = _bits_heatmap(ax_heat, data, lo, hi, [stats.a_bits[r] for r in regions] if labelled else [])
    step = max(1, math.ceil(n_col / 12))
    ticks = list(range(0, n_col, step))
    ax_heat.set_xticks(ticks, [str(stats.iters[j]) for j in ticks], fontsize=8)
    rstep = max(1, math.ceil(n_reg / 40))
    ax_heat.set_yticks(
        range(0, n_reg, rstep),
        [_short(regions[i]) for i in range(0, n_reg, rstep)],
        fontsize=8 if n_reg <= 24 else 6,
    )
    for tp in log.turning_points:  # the switch takes effect from the first period after it
        after = [j for j, it in enumerate(stats.iters) if it > tp["iter"]]
        if after and after[0] > 0:
            ax_heat.axvline(after[0] - 0.5, color="tab:red", ls="--", lw=1.2)
    ax_heat.set_xlabel("iteration (end of period)")
    ax_heat.set_ylabel("region")
    ax_heat.set_title("Mean activation bits chosen per region and period", fontsize=10)
    fig.colorbar(im, ax=ax_heat, label="mean a bits", fraction=0.05, pad=0.02)
    fig.savefig(out)


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``curves.png``, ``precision.png``, ``cost.png`` and ``summary.md`` for one run, and
    ``gates.png`` (after ``cost.png``) when the run logs DFQ gate choices.

    Returns the written paths (images first). ``out_dir`` defaults to the run directory.
    """
    log = read_log(run_dir)
    out = Path(out_dir) if out_dir is not None else log.path.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "curves.png", out / "precision.png", out / "cost.png"]
    for draw, p in zip((_plot_curves, _plot_precision, _plot_cost), paths):
        draw(log, p)
    gates = gate_stats(log)
    by_class = gate_class_bits(log, gates) if gates is not None else None
    if gates is not None:
        paths.append(out / "gates.png")
        _plot_gates(log, gates, paths[-1])
    if by_class:
        paths.append(out / "gates_by_class.png")
        _plot_gates_by_class(log, gates, by_class, paths[-1])
    total = log.cum()
    iters = log.start.get("iters")
    status = "finished" if log.finished else f"unfinished (last logged iteration {log.last_iter})"
    lines = [
        f"# Training run: {log.start.get('model', '?')}",
        "",
        f"- schedule: {log.schedule} ({log.start.get('schedule_kind', '?')})",
        f"- iterations: {log.last_iter} of {iters if iters is not None else '?'} - {status}",
        f"- final test accuracy: {_fmt(_pct(log.final_test_acc), '.2f', '%')}",
        f"- best test accuracy: {_fmt(_pct(log.best_test_acc), '.2f', '%')}",
        f"- total cost: {_fmt(log.in_steps(total), '.1f')} {_cost_unit(log)}"
        f" ({_fmt(total, '.4g')} fp32-MAC units)",
        f"- saving vs fp32: {_fmt(log.saving('fp32'), '.1f', '%')}",
        f"- saving vs SBM: {_fmt(log.saving('sbm'), '.1f', '%')}",
    ]
    if log.resumes:
        lines.append(f"- resumed at iteration(s): {', '.join(str(r['iter']) for r in log.resumes)}")
    lines += ["", "## Turning points", ""]
    if log.turning_points:
        targets = [
            tp.get("target_cp") is not None and tp.get("precision") is None for tp in log.turning_points
        ]
        head = "target cp" if all(targets) else "a/w/g or target cp" if any(targets) else "a/w/g"
        lines += [f"| # | iteration | {head} | eps |", "|---|---|---|---|"]
        for tp in log.turning_points:
            lines.append(
                f"| {tp.get('index', '')} | {tp['iter']} | {_tp_change(tp)} | {_fmt(tp.get('eps'), '.4g')} |"
            )
    else:
        lines.append("none")
    if gates is not None:
        lines += [
            "",
            "## Gates (per-region precision)",
            "",
            "Bits chosen by each region's gate, share-weighted and averaged over the run (see gates.png).",
            "",
            "| region | mean a bits | mean g bits |",
            "|---|---|---|",
        ]
        for r in gates.regions:
            a, g = gates.mean_bits(r)
            lines.append(f"| {r.replace('|', '/')} | {a:.2f} | {g:.2f} |")
    if by_class:
        regions = list(by_class)
        n_cls = max(len(v) for v in by_class.values())
        lines += [
            "",
            "## Gates per class",
            "",
            "Mean activation bits each region's gate chose for the samples of each class, "
            "over the run (see gates_by_class.png).",
            "",
            "| class | " + " | ".join(r.replace("|", "/") for r in regions) + " |",
            "|---" * (len(regions) + 1) + "|",
        ]
        for c in range(n_cls):
            cells = [by_class[r][c] if c < len(by_class[r]) else math.nan for r in regions]
            lines.append(f"| {c} | " + " | ".join("-" if math.isnan(v) else f"{v:.2f}" for v in cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in paths] + [""]
    md = out / "summary.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return paths + [md]


def compare_runs(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """Test accuracy vs cumulative bit-cost of several runs in one PNG.

    The legend shows each run's ``start.label`` (if the log has one) or its schedule description.
    """
    logs = [read_log(d) for d in run_dirs]
    fig, (ax,) = _new_figure(height=5)
    labels = [log.label for log in logs]
    for log, label in zip(logs, labels):
        if labels.count(label) > 1:
            label = f"{label} ({log.path.parent.name})"
        pts = log.test_points()
        if pts:
            ax.plot(
                [log.in_steps(c) for _, c, _ in pts],
                [100 * a for _, _, a in pts],
                "o-",
                ms=3,
                label=label + ("" if log.finished else " [unfinished]"),
            )
    units = {_cost_unit(log) for log in logs}
    unit = units.pop() if len(units) == 1 else "mixed units"
    costs = [c for log in logs for _, c, _ in log.test_points() if c > 0]
    if costs and max(costs) > 20 * min(costs):  # fp32 next to 3-bit runs: spread them out
        ax.set_xscale("log")
        unit += ", log scale"
    ax.set_xlabel(f"cumulative bit-cost ({unit})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy vs training cost", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path


def summary_table(run_dirs: list[str | Path]) -> str:
    """A markdown table: run, schedule, final test acc, total cost, savings vs SBM and fp32."""
    rows = [
        "| run | schedule | final test acc (%) | total cost (fp32 steps) | saving vs SBM (%) "
        "| saving vs fp32 (%) |",
        "|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        log = read_log(d)
        name = log.path.parent.name + ("" if log.finished else " (unfinished)")
        rows.append(
            f"| {name} | {log.schedule.replace('|', '/')} "
            f"| {_fmt(_pct(log.final_test_acc))} | {_fmt(log.in_steps(log.cum()), '.1f')} "
            f"| {_fmt(log.saving('sbm'), '.1f')} | {_fmt(log.saving('fp32'), '.1f')} |"
        )
    return "\n".join(rows) + "\n"
