"""Training helpers: the three-line hook for your own loop, and ``fit`` for a complete one.

Your own loop::

    fmodel = fraccompile.compile(model, x).use_schedule(PFQ(eval_every=100))
    ...  loss.backward(); optimizer.step()
    fmodel.frac_step(loss)          # cost accounting + schedule; returns turning-point events

``fit(fmodel, data, iters=...)`` runs the loop: any optimizer (SGD by default), an LR schedule,
periodic evaluation, a rich progress bar, a JSONL log, atomic checkpoints and exact resume.

``data`` is any object with ``batches(epoch, start=0)`` (the epoch's training batches, starting at
batch ``start``, the same on every call), ``steps_per_epoch`` and optionally ``test_batches()``
(see :mod:`fraccompile.data`).

RUN_DIR/log.jsonl holds one JSON object per line, keyed by ``event``: ``start`` (model, schedule,
config, sites, cost of one fp32 and one SBM step), ``period`` (every ``eval_every`` iterations:
iter, epoch, lr, train_loss, train_acc, test_loss, test_acc, precision, cp, cum_cost, cum_fp32,
cum_sbm, wall, step_ms), ``turning_point``, ``resume`` and ``end``. Costs are in fp32-MAC units.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .model import FracModel

CHECKPOINT_VERSION = 1
LR_SCHEDULES = ("cosine", "piecewise", "constant")


# -- pieces usable on their own --------------------------------------------------------------------
def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (classifiers and language models alike)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def correct_count(output: torch.Tensor, target: torch.Tensor) -> int:
    return int((output.argmax(-1) == target).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, test_batches, loss_fn=default_loss) -> dict[str, float]:
    """Mean loss and top-1 accuracy over ``test_batches`` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in test_batches:
        out = model(x)
        n = y.numel()
        loss_sum += float(loss_fn(out, y)) * n
        correct += correct_count(out, y)
        count += n
    model.train(was_training)
    if not count:
        return {"test_loss": None, "test_acc": None}
    return {"test_loss": loss_sum / count, "test_acc": correct / count}


def lr_lambda(kind: str, iters: int) -> Callable[[int], float]:
    if kind == "cosine":
        return lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))
    if kind == "piecewise":  # x0.1 at 50% and 75% of training, as the ResNet CIFAR recipe
        return lambda i: 0.1 ** ((i >= iters // 2) + (i >= 3 * iters // 4))
    if kind == "constant":
        return lambda i: 1.0
    raise ValueError(f"unknown lr schedule {kind!r}: choose {', '.join(LR_SCHEDULES)}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically: a temporary file in the same directory, fsync, then rename, so an
    interrupted write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {state.get('version')!r}; "
                         f"this fraccompile reads version {CHECKPOINT_VERSION}")
    return state


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def schedule_precision(model: FracModel) -> dict[str, int]:
    """The precision the schedule runs at now (or the most common one among the sites)."""
    sched = model.frac_schedule
    gates = getattr(model, "frac_gates", None)
    if gates is not None and gates.last:  # DFQ: the share-weighted mean of the gates' choices
        rows = [r for r in model.cost().rows if not isinstance(r.a, int)]
        if rows:
            return {k: round(sum(getattr(r, k) for r in rows) / len(rows), 2) for k in "awg"}
    if sched is not None and hasattr(sched, "current"):
        a, w, g = sched.current()
    elif sched is not None and hasattr(sched, "current_at"):
        a, w, g = sched.current_at(model.frac_iteration)
    else:
        values = [p for _, p in model.precision.items()]
        a, w, g = max(set(values), key=values.count) if values else (0, 0, 0)
    return {"a": a, "w": w, "g": g}


# -- the loop ---------------------------------------------------------------------------------------
@dataclass
class FitResult:
    iterations: int
    periods: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


class _Log:
    """Appends JSON lines; on resume, drops the lines written after the checkpoint's iteration."""

    def __init__(self, path: Path | None, resume_iter: int | None):
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("iter", 0) <= resume_iter
                    and json.loads(ln).get("event") != "end"]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def fit(model: FracModel, data, *, iters: int, schedule=None, optimizer=None, lr: float = 0.1,
        momentum: float = 0.9, weight_decay: float = 5e-4, lr_schedule: str = "cosine",
        eval_every: int = 100, loss_fn=default_loss, out_dir: str | Path | None = None,
        resume: str | Path | None = None, progress: bool = True, seed: int = 0,
        deterministic: bool = False, console: Console | None = None,
        model_name: str | None = None, stop_at: int | None = None) -> FitResult:
    """Train ``model`` for ``iters`` iterations on ``data`` (see the module docstring).

    With ``out_dir``, writes ``log.jsonl`` and ``checkpoint.pt`` (after every period). With
    ``resume`` (a checkpoint path), continues exactly where that run stopped: same data order,
    RNG, optimizer, LR and schedule state, so precision switches (and, with ``deterministic``,
    losses) equal those of an uninterrupted run. ``stop_at`` ends the run early at that iteration
    (as an interruption would; the LR schedule still spans ``iters``).
    """
    if iters < 1 or eval_every < 1:
        raise ValueError("iters and eval_every must be at least 1")
    console = console or Console()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or was_deterministic)
    try:
        return _fit(model, data, iters, schedule, optimizer, lr, momentum, weight_decay,
                    lr_schedule, eval_every, loss_fn, out_dir, resume, progress, seed, console,
                    model_name, stop_at if stop_at is not None else iters)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _fit(model, data, iters, schedule, optimizer, lr, momentum, weight_decay, lr_schedule,
         eval_every, loss_fn, out_dir, resume, progress, seed, console, model_name,
         stop_at) -> FitResult:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, nesterov=momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(lr_schedule, iters))
    if schedule is not None:
        model.use_schedule(schedule)
    start = 0
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        model.precision.load_state_dict(state["precision"])
        if state["schedule"] is not None and hasattr(model.frac_schedule, "load_state_dict"):
            model.frac_schedule.load_state_dict(state["schedule"])
        model.frac_meter.load_state_dict(state["meter"])
        model.frac_iteration = start = state["iteration"]
        set_rng_state(state["rng"])
    run_dir = Path(out_dir) if out_dir is not None else None
    log = _Log(run_dir / "log.jsonl" if run_dir else None, start if state is not None else None)
    sched = model.frac_schedule
    if state is None:
        log.write({"event": "start", "time": time.time(), "model": model_name or type(model).__name__,
                   "schedule": sched.describe() if hasattr(sched, "describe") else str(sched),
                   "schedule_kind": (sched.state_dict().get("kind") if hasattr(sched, "state_dict")
                                     else type(sched).__name__.lower()),
                   "config": model.frac_config.to_dict(), "iters": iters, "eval_every": eval_every,
                   "batch_size": getattr(data, "batch_size", None),
                   "sites": [{"name": s.name, "macs": s.macs, "full_precision": s.full_precision}
                             for s in model.sites],
                   "cost_per_step": {"fp32": model.cost().fp32_total,
                                     "sbm": model.sbm_cost().total}})
    else:
        log.write({"event": "resume", "iter": start})
    result = FitResult(iterations=start, run_dir=run_dir)
    wall0 = time.perf_counter() - (state["wall"] if state is not None else 0.0)
    period_loss, period_correct, period_count, period_steps, period_t = 0.0, 0, 0, 0, 0.0
    gate_shares: dict[str, torch.Tensor] = {}
    gate_classes: dict[str, torch.Tensor] = {}  # per region: (classes, candidates) sample counts
    steps = data.steps_per_epoch
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console,
                   disable=not progress, transient=True)
    with bar:
        task = bar.add_task("train", total=iters, completed=start, status="")
        it = start
        model.train()
        while it < min(iters, stop_at):
            epoch, offset = divmod(it, steps)
            for x, y in islice(data.batches(epoch, start=offset), steps - offset):
                t0 = time.perf_counter()
                out = model(x)
                loss = loss_fn(out, y)
                total = loss
                if hasattr(model.frac_schedule, "regularizer"):  # DFQ / FracTrain cost term
                    total = loss + model.frac_schedule.regularizer(model)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                loss_value = loss.item()
                events = model.frac_step(loss_value)
                period_t += time.perf_counter() - t0
                period_loss += loss_value
                period_correct += correct_count(out.detach(), y)
                period_count += y.numel()
                period_steps += 1
                gates = getattr(model, "frac_gates", None)
                if gates is not None and gates.last:  # DFQ: which candidate each region chose
                    per_class = out.dim() == 2 and y.dim() == 1 and y.numel() == out.shape[0]
                    for region in gates.last:
                        share = gates.fractions(region).detach()
                        gate_shares[region] = gate_shares.get(region, 0) + share
                        if per_class:  # classification: which candidate each class's samples chose
                            onehot = gates.last[region].onehot.detach().float()
                            counts = gate_classes.get(region)
                            if counts is None:
                                counts = torch.zeros(out.shape[1], onehot.shape[1])
                            gate_classes[region] = counts.index_add_(0, y.cpu(), onehot.cpu())
                it += 1
                for event in events:
                    event = {**event, "iter": it}
                    log.write(event)
                    result.events.append(event)
                    change = (f"target cp {100 * event['target_cp']:.2f}%" if "target_cp" in event
                              else f"precision {event.get('precision')}")
                    console.print(f"iter {it}: turning point {event.get('index', '')} -> {change}")
                prec = schedule_precision(model)
                meter = model.frac_meter
                bar.update(task, completed=it, status=(
                    f"loss {loss_value:.3f}  a/w/g {prec['a']}/{prec['w']}/{prec['g']}  "
                    f"cost {meter.total / max(meter.fp32, 1e-9):.1%} of fp32"))
                if it % eval_every == 0 or it == iters:
                    record = {"event": "period", "iter": it, "epoch": it / steps,
                              "lr": optimizer.param_groups[0]["lr"],
                              "train_loss": period_loss / period_steps,
                              "train_acc": period_correct / max(period_count, 1),
                              **(evaluate(model, data.test_batches(), loss_fn)
                                 if hasattr(data, "test_batches") else
                                 {"test_loss": None, "test_acc": None}),
                              "precision": prec, "cp": model.cost().cp,
                              "cum_cost": meter.total, "cum_fp32": meter.fp32,
                              "cum_sbm": meter.sbm, "wall": time.perf_counter() - wall0,
                              "step_ms": 1000 * period_t / period_steps}
                    if gate_shares:
                        record["gates"] = {r: (s / period_steps).tolist()
                                           for r, s in gate_shares.items()}
                        record["gate_candidates"] = [list(p) for p in zip(gates.a, gates.g)]
                        gate_shares = {}
                    if gate_classes:
                        record["gate_classes"] = {r: c.round().int().tolist()
                                                  for r, c in gate_classes.items()}
                        gate_classes = {}
                    log.write(record)
                    result.periods.append(record)
                    acc = record["test_acc"]
                    console.print(f"iter {it:6d}  train loss {record['train_loss']:.4f}  "
                                  + (f"test acc {100 * acc:.2f}%  " if acc is not None else "")
                                  + f"a/w/g {prec['a']}/{prec['w']}/{prec['g']}  "
                                  f"cost {meter.total / meter.fp32:.1%} of fp32, "
                                  f"{meter.total / meter.sbm:.1%} of SBM")
                    period_loss, period_correct, period_count, period_steps, period_t = 0, 0, 0, 0, 0.0
                    if run_dir is not None:
                        save_checkpoint(_checkpoint(model, optimizer, scheduler, it,
                                                    time.perf_counter() - wall0),
                                        run_dir / "checkpoint.pt")
                if it >= min(iters, stop_at):
                    break
    meter = model.frac_meter
    result.iterations = it
    if it < iters:  # stopped early: no "end" record, the run can be resumed
        return result
    result.final = {"event": "end", "iter": it,
                    "test_acc": result.periods[-1]["test_acc"] if result.periods else None,
                    "cum_cost": meter.total, "cum_fp32": meter.fp32, "cum_sbm": meter.sbm,
                    "wall": time.perf_counter() - wall0}
    log.write(result.final)
    return result


def _checkpoint(model: FracModel, optimizer, scheduler, iteration: int, wall: float) -> dict:
    sched = model.frac_schedule
    return {"version": CHECKPOINT_VERSION, "iteration": iteration, "wall": wall,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "precision": model.precision.state_dict(),
            "schedule": sched.state_dict() if hasattr(sched, "state_dict") else None,
            "meter": model.frac_meter.state_dict(), "rng": rng_state(),
            "config": model.frac_config.to_dict()}
