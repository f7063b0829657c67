"""Plots and summaries of training logs (fraccompile.plots), on synthetic log.jsonl files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fraccompile.plots import compare_runs, read_log, render_report, summary_table

PNG_SIG = b"\x89PNG\r\n\x1a\n"
FP32_STEP = 3.0e6  # fp32-MAC units per fp32 training step (3 * 1e6 MACs)
SBM_STEP = FP32_STEP * (8 * 8) / (32 * 32)


def _write(run_dir: Path, records: list, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records) + tail
    (run_dir / "log.jsonl").write_text(text)
    return run_dir


def _start(schedule: str, kind: str, iters: int = 100) -> dict:
    return {
        "event": "start",
        "time": 1.7e9,
        "model": "resnet20",
        "schedule": schedule,
        "schedule_kind": kind,
        "config": {"a": 8},
        "iters": iters,
        "eval_every": 10,
        "batch_size": 128,
        "sites": [{"name": "conv", "macs": 1_000_000, "full_precision": False}],
        "cost_per_step": {"fp32": FP32_STEP, "sbm": SBM_STEP},
        "future_key": [1, 2],
    }


def _period(k: int, i: int, cum: float, **fields) -> dict:
    """The ``k``-th period record, ending at iteration ``i`` at cumulative cost ``cum``, in the
    writer's key order; ``fields`` give (or replace) the rest."""
    rec = {
        "event": "period",
        "iter": i,
        "epoch": i / 50,
        "lr": 0.1,
        "train_loss": 2.0 / (k + 1),
        "train_acc": None,
        "test_loss": None,
        "test_acc": None,
        "precision": None,
        "cp": None,
        "cum_cost": cum,
        "cum_fp32": i * FP32_STEP,
        "cum_sbm": i * SBM_STEP,
        "wall": float(i),
        "step_ms": None,
    }
    rec.update(fields)
    return rec


def _run(iters: int, bits_at, accs, end: bool = True, step_cost=None) -> list[dict]:
    """Periods every 10 iterations; ``bits_at(i)`` gives (a, g) for iteration i."""
    recs, cum = [], 0.0
    for k, i in enumerate(range(10, iters + 1, 10)):
        a, g = bits_at(i)
        cum += 10 * FP32_STEP * (a * a + g * a + a * g) / (3 * 32 * 32)
        recs.append(
            _period(
                k,
                i,
                cum,
                test_loss=2.2 / (k + 1),
                test_acc=accs[k],
                precision={"a": a, "w": a, "g": g},
                cp=0.1,
                step_ms=10.0,
                dfq_histogram={"4": 3},
            )
        )
    if end:
        last = recs[-1]
        recs.append(
            {
                "event": "end",
                "iter": iters,
                "test_acc": last["test_acc"],
                "cum_cost": last["cum_cost"],
                "cum_fp32": last["cum_fp32"],
                "cum_sbm": last["cum_sbm"],
                "wall": 100.0,
            }
        )
    return recs


PFQ_ACCS = [0.30, 0.45, 0.55, 0.62, 0.70, 0.78, 0.85, 0.9123, 0.905, 0.9087]


def _pfq_bits(i: int) -> tuple[int, int]:
    return (3, 6) if i <= 30 else (4, 6) if i <= 60 else (6, 8)


@pytest.fixture
def pfq_dir(tmp_path):
    recs = _run(100, _pfq_bits, PFQ_ACCS)
    tp1 = {
        "event": "turning_point",
        "iter": 30,
        "index": 1,
        "precision": {"a": 4, "w": 4, "g": 6},
        "eps": 0.05,
        "diffs": [0.1, 0.02],
        "normalizer": 1.5,
    }
    tp2 = dict(tp1, iter=60, index=2, precision={"a": 6, "w": 6, "g": 8}, eps=0.025)
    recs = (
        recs[:3]
        + [tp1, {"event": "dfq_block_hist", "iter": 35, "hist": [1, 2]}]
        + recs[3:6]
        + [tp2]
        + recs[6:]
    )
    return _write(tmp_path / "pfq", [_start("PFQ a 3->4->6, g 6->6->8", "pfq")] + recs)


@pytest.fixture
def static_dir(tmp_path):
    accs = [0.3 + 0.06 * k for k in range(10)]
    return _write(tmp_path / "sbm", [_start("static 8/8/8", "static")] + _run(100, lambda i: (8, 8), accs))


@pytest.fixture
def unfinished_dir(tmp_path):
    accs = [0.2, 0.4, None, 0.5]
    return _write(
        tmp_path / "cpt",
        [_start("CPT cyclic a 3..8, g 8", "cyclic")] + _run(40, lambda i: (3 + i % 6, 8), accs, end=False),
    )


# matplotlib's default line colours, in the order a plot's lines take them, and turning points'
BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)
TP_RED = (233, 140, 141)  # a thin tab:red line at alpha 0.7 on white, as Agg draws it
DPI = 120
SIZES = {
    "curves.png": (9 * DPI, 6 * DPI),
    "precision.png": (9 * DPI, 4.5 * DPI),
    "cost.png": (9 * DPI, 4.5 * DPI),
    "compare.png": (9 * DPI, 5 * DPI),
}
COLOURS = {
    "curves.png": (BLUE, ORANGE),
    "precision.png": (BLUE, ORANGE, GREEN),
    "cost.png": (BLUE, ORANGE, GREEN),
    "compare.png": (BLUE, ORANGE, GREEN),
}


def _colour_pixels(rgb: Image.Image, colour: tuple[int, int, int], tol: int = 6) -> int:
    """Pixels within ``tol`` of ``colour`` in every channel (a line's antialiased core)."""
    arr = np.asarray(rgb, dtype=np.int16)
    return int((np.abs(arr - np.array(colour, dtype=np.int16)) <= tol).all(-1).sum())


def _check_png(path: Path, colours=None) -> Image.Image:
    """The file decodes as a PNG of the figure's size (where known), is not blank (axes, text and
    data drawn: a good share of non-white pixels) and shows each expected line colour."""
    assert path.read_bytes()[:8] == PNG_SIG
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes every pixel: a truncated or corrupt file raises here
        rgb = im.convert("RGB")
    size = SIZES.get(path.name)
    if size is not None:
        assert rgb.size == (int(size[0]), int(size[1])), (path.name, rgb.size)
    else:
        assert 500 <= rgb.width <= 2000 and 250 <= rgb.height <= 1500, rgb.size
    white = _colour_pixels(rgb, (255, 255, 255), tol=8)
    inked = 1 - white / (rgb.width * rgb.height)
    assert 0.02 < inked < 0.95, (path.name, inked)
    assert len(rgb.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # antialiased drawing
    for colour in COLOURS.get(path.name, ()) if colours is None else colours:
        assert _colour_pixels(rgb, colour) > 30, (path.name, colour)  # at least its legend swatch
    return rgb


def test_check_png_rejects_blank_and_lineless_images(tmp_path):
    blank = tmp_path / "cost.png"
    Image.new("RGB", (9 * DPI, int(4.5 * DPI)), "white").save(blank)
    with pytest.raises(AssertionError):
        _check_png(blank)
    grey = tmp_path / "precision.png"  # inked, but none of the plotted lines' colours
    im = Image.new("RGB", (9 * DPI, int(4.5 * DPI)), "white")
    for x in range(0, im.width, 4):
        for y in range(0, im.height, 9):
            im.putpixel((x, y), (x % 200, x % 200, y % 200))
    im.save(grey)
    with pytest.raises(AssertionError):
        _check_png(grey)


def _expected(run_dir: Path) -> dict:
    """Final figures computed straight from the log, independently of fraccompile.plots."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    periods = [r for r in recs if r["event"] == "period"]
    ends = [r for r in recs if r["event"] == "end"]
    last = ends[-1] if ends else periods[-1]
    final = (
        ends[-1]["test_acc"] if ends else [p["test_acc"] for p in periods if p["test_acc"] is not None][-1]
    )

    def pct(x: float) -> str:
        return f"{x:.1f}%".replace("-0.0%", "0.0%")

    best = max(p["test_acc"] for p in periods if p["test_acc"] is not None)
    return {
        "final": f"{100 * final:.2f}%",
        "best": f"{100 * best:.2f}%",
        "steps": f"{last['cum_cost'] / FP32_STEP:.1f}",
        "fp32": pct(100 * (1 - last["cum_cost"] / last["cum_fp32"])),
        "sbm": pct(100 * (1 - last["cum_cost"] / last["cum_sbm"])),
    }


def test_read_log_ignores_unknown_events_and_keys(pfq_dir):
    log = read_log(pfq_dir)  # a run directory or the file itself
    assert read_log(pfq_dir / "log.jsonl").periods == log.periods
    assert log.start["model"] == "resnet20" and log.finished
    assert len(log.periods) == 10 and [t["iter"] for t in log.turning_points] == [30, 60]
    assert log.resumes == [] and log.end["iter"] == 100
    assert log.final_test_acc == 0.9087 and log.best_test_acc == 0.9123


def test_render_report_writes_valid_pngs(pfq_dir, tmp_path):
    out = tmp_path / "report"
    paths = render_report(pfq_dir, out)
    assert [p.name for p in paths] == ["curves.png", "precision.png", "cost.png", "summary.md"]
    assert all(p.parent == out for p in paths)
    images = {p.name: _check_png(p) for p in paths[:3]}
    # the data lines themselves, not only their legend swatches: a = w (blue under orange
    # dashes), g apart from them; the turning points' red dashed lines (alpha 0.7 on white)
    for name, colour in [
        ("precision.png", ORANGE),
        ("precision.png", GREEN),
        ("curves.png", BLUE),
        ("cost.png", BLUE),
        ("cost.png", GREEN),
    ]:
        assert _colour_pixels(images[name], colour) > 300, (name, colour)
    for name in ("curves.png", "precision.png", "cost.png"):
        assert _colour_pixels(images[name], TP_RED, tol=25) > 100, name


def test_summary_md_figures(pfq_dir):
    paths = render_report(pfq_dir)  # default: into the run directory
    assert paths[-1] == pfq_dir / "summary.md"
    md = paths[-1].read_text()
    exp = _expected(pfq_dir)
    assert exp["final"] == "90.87%" and exp["best"] == "91.23%"
    assert f"final test accuracy: {exp['final']}" in md
    assert f"best test accuracy: {exp['best']}" in md
    assert f"total cost: {exp['steps']} fp32 training steps" in md
    assert f"saving vs fp32: {exp['fp32']}" in md and f"saving vs SBM: {exp['sbm']}" in md
    assert "resnet20" in md and "PFQ a 3->4->6" in md and "iterations: 100 of 100" in md
    assert "| 1 | 30 | 4/4/6 | 0.05 |" in md and "| 2 | 60 | 6/6/8 | 0.025 |" in md
    for name in ("curves", "precision", "cost"):
        assert f"![{name}]({name}.png)" in md


def test_static_run(static_dir):
    paths = render_report(static_dir)
    for p in paths[:3]:
        _check_png(p)
    md = paths[-1].read_text()
    exp = _expected(static_dir)
    assert exp["sbm"] == "0.0%" and 93.7 <= float(exp["fp32"][:-1]) <= 93.8
    assert f"saving vs SBM: {exp['sbm']}" in md and f"saving vs fp32: {exp['fp32']}" in md
    assert "## Turning points\n\nnone" in md


def test_unfinished_run(unfinished_dir):
    log = read_log(unfinished_dir)
    assert not log.finished and log.last_iter == 40 and log.final_test_acc == 0.5
    paths = render_report(unfinished_dir)
    for p in paths[:3]:
        _check_png(p)
    md = paths[-1].read_text()
    exp = _expected(unfinished_dir)
    assert "unfinished (last logged iteration 40)" in md and "iterations: 40 of 100" in md
    assert f"final test accuracy: {exp['final']}" in md and exp["final"] == "50.00%"
    assert f"total cost: {exp['steps']} fp32 training steps" in md
    assert f"saving vs fp32: {exp['fp32']}" in md


def test_resume_drops_replayed_records(tmp_path):
    recs = _run(100, _pfq_bits, PFQ_ACCS)
    tp = {"event": "turning_point", "iter": 60, "index": 1, "precision": {"a": 6, "w": 6, "g": 8}}
    # the first attempt got to iteration 70 (with a turning point at 60), then resumed from 50
    lines = [_start("PFQ", "pfq")] + recs[:5] + [tp] + recs[5:7] + [{"event": "resume", "iter": 50}]
    run = _write(tmp_path / "resumed", lines + recs[5:])
    log = read_log(run)
    assert [p["iter"] for p in log.periods] == list(range(10, 101, 10))
    assert log.turning_points == [] and [r["iter"] for r in log.resumes] == [50] and log.finished
    assert "resumed at iteration(s): 50" in render_report(run)[-1].read_text()


def test_missing_log_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_log(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        render_report(tmp_path)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_log_names_file(tmp_path, text):
    (tmp_path / "log.jsonl").write_text(text)
    with pytest.raises(ValueError, match=r"log\.jsonl.*empty"):
        read_log(tmp_path)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "event"),
        ('{"iter": 3}', "event"),
        ('{"event": "period", "iter": "ten"}', "iter"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, msg):
    recs = _run(30, _pfq_bits, PFQ_ACCS)
    _write(tmp_path, [_start("PFQ", "pfq"), recs[0], bad, recs[1]])
    with pytest.raises(ValueError, match=rf"log\.jsonl:3: .*{msg}"):
        read_log(tmp_path)


def test_event_before_start_and_partial_last_line(tmp_path):
    recs = _run(30, _pfq_bits, PFQ_ACCS, end=False)
    _write(tmp_path / "a", [recs[0], _start("PFQ", "pfq")])
    with pytest.raises(ValueError, match=r"log\.jsonl:1: .*before"):
        read_log(tmp_path / "a")
    # a run being written: its last line may be cut short (no trailing newline) and is skipped
    run = _write(tmp_path / "b", [_start("PFQ", "pfq")] + recs, tail='{"event": "per')
    assert len(read_log(run).periods) == 3


GATE_CANDS = [[3, 6], [4, 6], [4, 8], [6, 8], [6, 12]]
GATE_REGIONS = ["stem", "layer1.0", "layer2.0"]
# per period (iterations 10, 20, 30, 35: the last one is short), per region: candidate shares
GATE_SHARES = [
    dict(zip(GATE_REGIONS, shares))
    for shares in (
        ([0.5, 0.3, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.25, 0.25, 0.5]),
        ([0.6, 0.2, 0.1, 0.1, 0.0], [0.4, 0.3, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]),
        ([0.1, 0.2, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.3, 0.4], [0.05, 0.05, 0.1, 0.2, 0.6]),
        ([0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.2, 0.3, 0.5], [0.0, 0.0, 0.0, 0.2, 0.8]),
    )
]
DFQ_ITERS = [10, 20, 30, 35]


@pytest.fixture
def dfq_dir(tmp_path):
    """A FracTrain run: gate shares per region, float (share-weighted) precisions, and a turning
    point that raises the cost target instead of switching a precision."""
    recs, cum, prev = [], 0.0, 0
    for k, (i, gates) in enumerate(zip(DFQ_ITERS, GATE_SHARES)):
        a = sum(s * c[0] for sh in gates.values() for s, c in zip(sh, GATE_CANDS)) / 3
        g = sum(s * c[1] for sh in gates.values() for s, c in zip(sh, GATE_CANDS)) / 3
        cum += (i - prev) * FP32_STEP * (a * 8 + g * 8 + a * g) / (3 * 32 * 32)
        prev = i
        recs.append(
            _period(
                k,
                i,
                cum,
                train_acc=0.2 + 0.1 * k,
                test_loss=2.1 / (k + 1),
                test_acc=0.25 + 0.1 * k,
                precision={"a": round(a, 2), "w": 8, "g": round(g, 2)},
                cp=0.02,
                step_ms=12.0,
                gates=gates,
                gate_candidates=GATE_CANDS,
            )
        )
    tp = {
        "event": "turning_point",
        "iter": 20,
        "index": 1,
        "eps": 0.05,
        "diffs": [0.1, 0.03],
        "normalizer": 1.2,
        "target_cp": 0.02,
    }
    end = {
        "event": "end",
        "iter": 35,
        "test_acc": recs[-1]["test_acc"],
        "cum_cost": cum,
        "cum_fp32": 35 * FP32_STEP,
        "cum_sbm": 35 * SBM_STEP,
        "wall": 40.0,
    }
    start = _start("FracTrain target cp 1.50% + 0.50% per PFQ turning point", "fractrain", 35)
    return _write(tmp_path / "dfq", [start] + recs[:2] + [tp] + recs[2:] + [end])


def _expected_gate_bits(run_dir: Path) -> dict[str, tuple[float, float]]:
    """Per region: mean (a, g) bits over the run, each period weighted by its iterations."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    sums: dict[str, list[float]] = {}
    prev = 0
    for r in recs:
        if r["event"] != "period":
            continue
        w, prev = r["iter"] - prev, r["iter"]
        for region, shares in r["gates"].items():
            acc = sums.setdefault(region, [0.0, 0.0, 0.0])
            acc[0] += w * sum(s * a for s, (a, _) in zip(shares, r["gate_candidates"]))
            acc[1] += w * sum(s * g for s, (_, g) in zip(shares, r["gate_candidates"]))
            acc[2] += w
    return {region: (a / w, g / w) for region, (a, g, w) in sums.items()}


def test_dfq_run_gates_report(dfq_dir, tmp_path):
    out = tmp_path / "report"
    paths = render_report(dfq_dir, out)
    assert [p.name for p in paths] == ["curves.png", "precision.png", "cost.png", "gates.png", "summary.md"]
    for p in paths[:4]:  # float precisions in the periods do not break precision.png
        _check_png(p)
    md = paths[-1].read_text()
    assert "![gates](gates.png)" in md
    exp = _expected_gate_bits(dfq_dir)
    assert list(exp) == ["stem", "layer1.0", "layer2.0"]
    for region, (a, g) in exp.items():
        assert f"| {region} | {a:.2f} | {g:.2f} |" in md
    # by hand: layer2.0 chose 5.5, 5.4, 5.55 and 6 a bits in periods of 10, 10, 10 and 5
    # iterations: (55 + 54 + 55.5 + 30) / 35 = 5.557 (an unweighted mean would give 5.61)
    assert f"{exp['layer2.0'][0]:.2f}" == "5.56" and "| layer2.0 | 5.56 |" in md
    # FracTrain's turning point raises the cost target; its row shows the target, not 32/32/32
    assert "| # | iteration | target cp | eps |" in md and "| 1 | 20 | cp 2.00% | 0.05 |" in md
    assert "32/32/32" not in md
    assert f"final test accuracy: {100 * (0.25 + 0.3):.2f}%" in md


def test_per_class_gate_bits(dfq_dir, tmp_path):
    """gate_classes (per region: samples of each class per candidate) summed over the periods
    give the mean activation bits per class, in gates_by_class.png and a table."""
    log = dfq_dir / "log.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    # class 0 always picks candidate 0 (a=3) in stem; class 1 picks candidate 4 (a=6) in the first
    # period and candidate 1 (a=4) in the second: (2·6 + 2·4) / 4 = 5 bits
    tables = [{"stem": [[1, 0, 0, 0, 0], [0, 0, 0, 0, 2]]}, {"stem": [[3, 0, 0, 0, 0], [0, 2, 0, 0, 0]]}]
    periods = [r for r in recs if r["event"] == "period"]
    for r, t in zip(periods, tables):
        r["gate_classes"] = t
    log.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    paths = render_report(dfq_dir, tmp_path / "out")
    names = [p.name for p in paths]
    assert names[names.index("gates.png") + 1] == "gates_by_class.png"
    _check_png(tmp_path / "out" / "gates_by_class.png")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Gates per class" in md and "| class | stem |" in md
    assert "| 0 | 3.00 |" in md and "| 1 | 5.00 |" in md


def test_run_without_gates_has_no_gates_png(pfq_dir, static_dir, tmp_path):
    for run in (pfq_dir, static_dir):
        out = tmp_path / run.name
        paths = render_report(run, out)
        assert "gates.png" not in [p.name for p in paths] and not (out / "gates.png").exists()
        md = paths[-1].read_text()
        assert "gates" not in md.lower() and "a/w/g or target" not in md


def test_compare_runs_and_summary_table(pfq_dir, static_dir, unfinished_dir, tmp_path):
    runs = [pfq_dir, static_dir, unfinished_dir]
    out = compare_runs(runs, tmp_path / "cmp" / "compare.png")
    assert out == tmp_path / "cmp" / "compare.png"
    _check_png(out)
    table = summary_table(runs).splitlines()
    assert len(table) == 2 + len(runs) and table[0].startswith("| run | schedule |")
    for run, row in zip(runs, table[2:]):
        exp = _expected(run)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(run.name)
        assert cells[2:] == [
            exp["final"].rstrip("%"),
            exp["steps"],
            exp["sbm"].rstrip("%"),
            exp["fp32"].rstrip("%"),
        ]
    assert "(unfinished)" in table[4] and "CPT cyclic" in table[4]


def test_no_pyplot(pfq_dir, tmp_path):
    """Rendering must not import pyplot (global backend state of other users)."""
    code = (
        "import sys; from fraccompile.plots import render_report, compare_runs; "
        f"render_report({str(pfq_dir)!r}, {str(tmp_path / 'o')!r}); "
        f"compare_runs([{str(pfq_dir)!r}], {str(tmp_path / 'c.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
