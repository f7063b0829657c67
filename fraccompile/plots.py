"""Plots and markdown summaries of a training run's ``log.jsonl``.

A run directory holds ``log.jsonl``: one JSON object per line with an ``"event"`` key (``start``,
``period``, ``turning_point``, ``resume``, ``end``; see ``fraccompile/train.py``). Unknown events
and keys are ignored, and a run may be unfinished (no ``end``). Costs are in fp32-MAC units; the
plots and tables show them in "fp32 training steps" (``cum / start.cost_per_step.fp32``).

Figures are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so
rendering touches no global matplotlib state and works without a display.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import FracCompileError

LOG_NAME = "log.jsonl"
FULL_BITS = 32  # a precision of 0 (or a missing one) means full precision
_DPI = 120


class LogError(FracCompileError, ValueError):
    """``log.jsonl`` is empty or has a malformed line; the message names the file and line."""


@dataclass
class RunLog:
    """The events of one run, in file order (periods replaced after a resume are dropped)."""

    path: Path
    start: dict[str, Any]
    periods: list[dict[str, Any]] = field(default_factory=list)
    turning_points: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def last_iter(self) -> int:
        if self.end is not None:
            return self.end["iter"]
        return self.periods[-1]["iter"] if self.periods else 0

    @property
    def schedule(self) -> str:
        return str(self.start.get("schedule", "?"))

    @property
    def label(self) -> str:
        return str(self.start.get("label") or self.schedule)

    def test_points(self) -> list[tuple[int, float, float]]:
        """``(iter, cum_cost, test_acc)`` for every evaluation with a test accuracy."""
        pts = [(p["iter"], p.get("cum_cost"), p.get("test_acc")) for p in self.periods]
        if self.end is not None and (not pts or pts[-1][0] != self.end["iter"]):
            pts.append((self.end["iter"], self.end.get("cum_cost"), self.end.get("test_acc")))
        return [(i, c, a) for i, c, a in pts if a is not None and c is not None]

    @property
    def final_test_acc(self) -> float | None:
        if self.end is not None and self.end.get("test_acc") is not None:
            return self.end["test_acc"]
        accs = [p["test_acc"] for p in self.periods if p.get("test_acc") is not None]
        return accs[-1] if accs else None

    @property
    def best_test_acc(self) -> float | None:
        accs = [a for _, _, a in self.test_points()]
        return max(accs) if accs else None

    def cum(self, key: str = "cum_cost") -> float | None:
        """Final cumulative cost (``cum_cost``, ``cum_fp32`` or ``cum_sbm``) in fp32-MAC units."""
        for rec in ([self.end] if self.end else []) + self.periods[::-1]:
            if rec.get(key) is not None:
                return rec[key]
        return None

    @property
    def fp32_step(self) -> float | None:
        v = (self.start.get("cost_per_step") or {}).get("fp32")
        return v if v else None

    def in_steps(self, cost: float | None) -> float | None:
        """A cost in fp32 training steps (or unchanged when the log has no per-step fp32 cost)."""
        return None if cost is None else cost / (self.fp32_step or 1.0)

    def saving(self, ref: str) -> float | None:
        """Percent saved against ``"fp32"`` or ``"sbm"`` (positive = cheaper than the reference)."""
        cost, base = self.cum(), self.cum(f"cum_{ref}")
        if cost is None or not base:
            return None
        return round(100.0 * (1.0 - cost / base), 9) + 0.0  # + 0.0: no "-0.0%"


def _log_path(run: str | Path) -> Path:
    run = Path(run)
    return run / LOG_NAME if run.is_dir() else run


def read_log(path: str | Path) -> RunLog:
    """Parse a ``log.jsonl`` (or a run directory holding one).

    Raises :class:`FileNotFoundError` for a missing file and :class:`LogError` (a ``ValueError``)
    for an empty log, a log without a ``start`` event, or a malformed line. A malformed *last* line
    without a trailing newline is a write in progress (the run is still going) and is skipped.
    """
    path = _log_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log here")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    log: RunLog | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break  # partial line of a run being written
            raise LogError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
            raise LogError(f"{path}:{n}: expected a JSON object with an \"event\" key")
        event = rec["event"]
        if event == "start":
            log = RunLog(path, rec)
            continue
        if event not in ("period", "turning_point", "resume", "end"):
            continue  # unknown events come from newer writers
        if log is None:
            raise LogError(f"{path}:{n}: {event!r} event before the \"start\" event")
        if not isinstance(rec.get("iter"), int):
            raise LogError(f"{path}:{n}: {event!r} event without an integer \"iter\"")
        if event == "period":
            log.periods.append(rec)
        elif event == "turning_point":
            log.turning_points.append(rec)
        elif event == "resume":  # records after the checkpoint were replayed: keep the new ones
            log.periods = [p for p in log.periods if p["iter"] <= rec["iter"]]
            log.turning_points = [t for t in log.turning_points if t["iter"] <= rec["iter"]]
            log.resumes.append(rec)
            log.end = None
        else:
            log.end = rec
    if log is None:
        raise LogError(f"{path}: empty log (no \"start\" event)")
    return log


def _bits(prec: dict | None, key: str) -> int:
    v = (prec or {}).get(key)
    return v if v else FULL_BITS


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
            p = tp.get("precision")
            ax.annotate(f"TP{tp.get('index', '')}: {_bits(p, 'a')}/{_bits(p, 'w')}/{_bits(p, 'g')}",
                        (tp["iter"], 1), xycoords=("data", "axes fraction"), xytext=(3, -4),
                        textcoords="offset points", va="top", rotation=90, fontsize=8,
                        color="tab:red")
    for r in log.resumes:
        ax.axvline(r["iter"], color="gray", ls=":", lw=0.9)


def _plot_curves(log: RunLog, out: Path) -> None:
    fig, (ax_loss, ax_acc) = _new_figure(2, 6)
    ps = log.periods
    ax_loss.plot([p["iter"] for p in ps], [_num(p.get("train_loss")) for p in ps],
                 label="train loss")
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
    pts = sorted([(p["iter"], 0, p.get("precision")) for p in log.periods]
                 + [(t["iter"], 1, t.get("precision")) for t in log.turning_points],
                 key=lambda x: x[:2])
    fig, (ax,) = _new_figure()
    if pts:
        xs = [x for x, _, _ in pts] + [max(log.last_iter, pts[-1][0])]
        for key, name, style in (("a", "a (activations)", "-"), ("w", "w (weights)", "--"),
                                 ("g", "g (gradients)", "-")):
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
    for key, name, style in (("cum_cost", "this run", "-"), ("cum_sbm", "SBM (static 8/8/8)", ":"),
                             ("cum_fp32", "fp32", "--")):
        ys = ([] if log_y else [0.0]) + [_num(log.in_steps(p.get(key))) for p in log.periods]
        ax.plot(xs, ys, ls=style, lw=2 if key == "cum_cost" else 1.3, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"cumulative bit-cost ({_cost_unit(log)}{', log scale' if log_y else ''})")
    ax.set_title(f"Training cost - saving {_fmt(log.saving('fp32'), '.1f', '%')} vs fp32, "
                 f"{_fmt(log.saving('sbm'), '.1f', '%')} vs SBM", fontsize=10)
    _mark_events(ax, log)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(out)


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``curves.png``, ``precision.png``, ``cost.png`` and ``summary.md`` for one run.

    Returns the written paths (images first). ``out_dir`` defaults to the run directory.
    """
    log = read_log(run_dir)
    out = Path(out_dir) if out_dir is not None else log.path.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "curves.png", out / "precision.png", out / "cost.png"]
    for draw, p in zip((_plot_curves, _plot_precision, _plot_cost), paths):
        draw(log, p)
    total = log.cum()
    iters = log.start.get("iters")
    status = "finished" if log.finished else f"unfinished (last logged iteration {log.last_iter})"
    lines = [f"# Training run: {log.start.get('model', '?')}", "",
             f"- schedule: {log.schedule} ({log.start.get('schedule_kind', '?')})",
             f"- iterations: {log.last_iter} of {iters if iters is not None else '?'} - {status}",
             f"- final test accuracy: {_fmt(_pct(log.final_test_acc), '.2f', '%')}",
             f"- best test accuracy: {_fmt(_pct(log.best_test_acc), '.2f', '%')}",
             f"- total cost: {_fmt(log.in_steps(total), '.1f')} {_cost_unit(log)}"
             f" ({_fmt(total, '.4g')} fp32-MAC units)",
             f"- saving vs fp32: {_fmt(log.saving('fp32'), '.1f', '%')}",
             f"- saving vs SBM: {_fmt(log.saving('sbm'), '.1f', '%')}"]
    if log.resumes:
        lines.append(f"- resumed at iteration(s): {', '.join(str(r['iter']) for r in log.resumes)}")
    lines += ["", "## Turning points", ""]
    if log.turning_points:
        lines += ["| # | iteration | a/w/g | eps |", "|---|---|---|---|"]
        for tp in log.turning_points:
            p = tp.get("precision")
            lines.append(f"| {tp.get('index', '')} | {tp['iter']} | "
                         f"{_bits(p, 'a')}/{_bits(p, 'w')}/{_bits(p, 'g')} | "
                         f"{_fmt(tp.get('eps'), '.4g')} |")
    else:
        lines.append("none")
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
            ax.plot([log.in_steps(c) for _, c, _ in pts], [100 * a for _, _, a in pts], "o-", ms=3,
                    label=label + ("" if log.finished else " [unfinished]"))
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
    rows = ["| run | schedule | final test acc (%) | total cost (fp32 steps) | saving vs SBM (%) "
            "| saving vs fp32 (%) |", "|---|---|---|---|---|---|"]
    for d in run_dirs:
        log = read_log(d)
        name = log.path.parent.name + ("" if log.finished else " (unfinished)")
        rows.append(f"| {name} | {log.schedule.replace('|', '/')} "
                    f"| {_fmt(_pct(log.final_test_acc))} | {_fmt(log.in_steps(log.cum()), '.1f')} "
                    f"| {_fmt(log.saving('sbm'), '.1f')} | {_fmt(log.saving('fp32'), '.1f')} |")
    return "\n".join(rows) + "\n"
