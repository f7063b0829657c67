"""fit(): logs, exact resume, atomic checkpoints; the three-line hook; `fraccompile train/report`."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from _cli_helpers import static_train_args
from typer.testing import CliRunner

import fraccompile
from fraccompile.cli import app
from fraccompile.control import PFQ, Static
from fraccompile.cost import cost_report
from fraccompile.data import ClassificationData
from fraccompile.examples.functional_model import FunctionalNet
from fraccompile.train import CHECKPOINT_KEYS, CHECKPOINT_VERSION, fit, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def data():
    return ClassificationData.from_source("bundled", batch_size=16, train_limit=160, test_limit=32, seed=0)


def _compiled():
    torch.manual_seed(0)
    return fraccompile.compile(FunctionalNet(), torch.zeros(16, 3, 32, 32))


def _run(data, out, **kw):
    return fit(
        _compiled(),
        data,
        iters=24,
        schedule=PFQ(eval_every=1, eps=0.3),
        eval_every=4,
        lr=0.05,
        out_dir=out,
        progress=False,
        deterministic=True,
        **kw,
    )


def test_resume_equals_uninterrupted_run(data, tmp_path):
    full = _run(data, tmp_path / "full")
    _run(data, tmp_path / "split", stop_at=12)
    assert not (tmp_path / "split" / "log.jsonl").read_text().count('"end"')
    resumed = _run(data, tmp_path / "split", resume=tmp_path / "split" / "checkpoint.pt")
    assert full.events, "the PFQ indicator should fire in this run"
    assert [e["iter"] for e in resumed.events] == [e["iter"] for e in full.events if e["iter"] > 12]
    assert [p["train_loss"] for p in resumed.periods] == [
        p["train_loss"] for p in full.periods if p["iter"] > 12
    ]
    assert resumed.final["cum_cost"] == full.final["cum_cost"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run's log reads as one run: every period once, then the end
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["event"] == "period"] == [4, 8, 12, 16, 20, 24]
    assert [r["event"] for r in log].count("resume") == 1 and log[-1]["event"] == "end"


def test_log_records(data, tmp_path):
    result = _run(data, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    start = log[0]
    assert start["event"] == "start" and start["iters"] == 24
    assert start["cost_per_step"]["fp32"] > start["cost_per_step"]["sbm"] > 0
    periods = [r for r in log if r["event"] == "period"]
    assert len(periods) == 6
    for key in ("train_loss", "test_acc", "precision", "cum_cost", "cum_fp32", "cum_sbm", "wall"):
        assert key in periods[-1]
    cums = [p["cum_cost"] for p in periods]
    assert cums == sorted(cums) and periods[-1]["cum_cost"] < periods[-1]["cum_sbm"]
    tps = [r for r in log if r["event"] == "turning_point"]
    assert [t["iter"] for t in tps] == [e["iter"] for e in result.events]


def _state(iteration, **extra):
    """A minimal state load_checkpoint accepts."""
    return {**dict.fromkeys(CHECKPOINT_KEYS), "version": CHECKPOINT_VERSION, "iteration": iteration, **extra}


def test_atomic_checkpoint_survives_an_interrupted_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1, payload=torch.arange(5)), path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["payload"], torch.arange(5))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_three_line_hook_counts_cost_and_drives_precision(data):
    fm = _compiled().use_schedule(Static(4, 4, 8))
    assert fm.precision[fm.precision.sites[0]] == (4, 4, 8)
    opt = torch.optim.SGD(fm.parameters(), lr=0.01)
    for x, y in list(data.batches(0))[:3]:
        loss = torch.nn.functional.cross_entropy(fm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fm.frac_step(loss)
    per_step = fm.cost()
    assert fm.frac_meter.steps == 3
    assert fm.frac_meter.total == pytest.approx(3 * per_step.total)
    assert fm.frac_meter.fp32 == pytest.approx(3 * per_step.fp32_total)
    sbm = cost_report(
        (s.name, s.macs, (0, 0, 0) if s.full_precision else (8, 8, 8), s.full_precision) for s in fm.sites
    )
    assert fm.frac_meter.sbm == pytest.approx(3 * sbm.total)
    with pytest.raises(TypeError, match="not a schedule"):
        fm.use_schedule(object())


def test_cli_train_resume_and_report(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "train",
        str(REPO / "examples" / "functional_model.py"),
        "--data",
        "cifar10:bundled",
        "--schedule",
        "pfq",
        "--fw",
        "4,8",
        "--bw",
        "8,8",
        "--pfq-every",
        "1",
        "--eps",
        "0.5",
        "--iters",
        "8",
        "--eval-every",
        "4",
        "--batch-size",
        "16",
        "--train-limit",
        "128",
        "--test-limit",
        "32",
        "--out",
        str(out),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint.pt").exists() and (out / "curves.png").exists()
    assert "saved against static 8/8/8" in res.output
    res = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "summary.md").exists()
    res = runner.invoke(
        app, args[:-2] + ["--iters", "12", "--out", str(out), "--resume", str(out / "checkpoint.pt")]
    )
    assert res.exit_code == 0, res.output
    # bad input: one line, no traceback
    res = runner.invoke(app, ["train", str(REPO / "examples" / "functional_model.py"), "--schedule", "nope"])
    assert res.exit_code == 2 and res.stderr.startswith("fraccompile: error:")
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "missing" in res.stderr


def test_cli_train_transformer_on_shakespeare_loss_falls(tmp_path):
    if SHAKESPEARE.exists():
        text_path = SHAKESPEARE
    else:  # a small stand-in with the same 65-character vocabulary size is not needed: any text
        text_path = tmp_path / "text.txt"
        text_path.write_text("To be, or not to be, that is the question.\n" * 400)
    out = tmp_path / "lm"
    args = static_train_args(
        REPO / "examples" / "transformer_lm.py",
        data=f"shakespeare:{text_path}",
        iters=80,
        eval_every=40,
        batch_size=8,
        block_size=32,
        optimizer="adamw",
        lr="0.003",
        lr_schedule="constant",
        test_limit=64,
        out=out,
    )
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    periods = [
        json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"period"' in line
    ]
    assert len(periods) == 2
    # an untrained model starts at about ln(vocab size) = ln 65 = 4.17
    assert periods[-1]["train_loss"] < periods[0]["train_loss"] - 0.15
    assert periods[-1]["train_loss"] < math.log(65) - 0.8
    assert periods[-1]["test_loss"] < 3.5


def test_fit_config_validates_replaces_and_builds_the_optimizer(data, tmp_path):
    from fraccompile import ConfigError
    from fraccompile.fitconfig import FitConfig, make_optimizer

    for bad, field_name in (
        ({"iters": 0}, "iters"),
        ({"iters": 4, "lr_schedule": "step"}, "lr schedule"),
        ({"iters": 4, "optimizer": "lion"}, "optimizer"),
        ({"iters": 4, "distributed": "mpi"}, "distributed"),
        ({"iters": 4, "nonfinite": "ignore"}, "nonfinite"),
        ({"iters": 4, "timeout": 0}, "timeout"),
    ):
        with pytest.raises(ConfigError, match=field_name):
            FitConfig(**bad)
    cfg = FitConfig(iters=8, eval_every=4, out_dir=tmp_path, stop_at=5)
    assert cfg.end == 5 and cfg.replace(stop_at=None).end == 8
    assert json.loads(json.dumps(cfg.to_dict()))["out_dir"] == str(tmp_path)
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, FitConfig(iters=1, lr=0.2))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert sgd.defaults["weight_decay"] == 5e-4 and sgd.defaults["lr"] == 0.2
    adamw = make_optimizer(params, FitConfig(iters=1, optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01
    # a config and keyword overrides; run.json from run_info (what the CLI records)
    res = fit(
        _compiled(),
        data,
        FitConfig(iters=24, eval_every=4, progress=False, run_info={"model": "FunctionalNet"}),
        schedule=Static(8, 8, 8),
        iters=4,
        out_dir=tmp_path / "run",
    )
    assert res.iterations == 4
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"] == "FunctionalNet" and run["fit"]["iters"] == 4
    assert run["world_size"] == 1 and run["config"]["a"] == 8
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 1 and start["parallel"] == "none"
    assert start["schedule_kind"] == "static"
