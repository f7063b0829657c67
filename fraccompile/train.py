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
cum_sbm, wall, step_ms, skipped), ``turning_point``, ``resume``, ``stopped`` (non-finite steps)
and ``end``. Costs are in fp32-MAC units. The log is strict JSON: a value that is not finite is
``null``.

Non-finite steps: a step whose loss or gradient is NaN or infinite changes nothing (no optimizer
step; buffers such as BatchNorm's running statistics are restored), is counted (``skipped``) and
moves on to the next batch; ``max_nonfinite`` such steps in a row (or the first one, with
``nonfinite="stop"``) stop the run with :class:`NonFiniteError`, leaving the last checkpoint, which
is always finite, to resume from.

Checkpoints (see :func:`save_checkpoint`) hold tensors and plain data only, are loaded with
``torch.load(weights_only=True)``, so loading one runs no code, and carry a checksum of their
content; :func:`load_checkpoint` refuses a damaged one with a :class:`CheckpointError` naming the
problem.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import re
import time
import warnings
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

from . import fileio
from .errors import FracCompileError
from .model import FracModel

CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = ("iteration", "wall", "model", "optimizer", "lr_scheduler", "precision",
                   "schedule", "meter", "rng")
LR_SCHEDULES = ("cosine", "piecewise", "constant")
NONFINITE = ("skip", "stop")


class CheckpointError(FracCompileError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


class NonFiniteError(FracCompileError):
    """Training stopped on non-finite losses or gradients (see the module docstring)."""


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
    """Write ``state`` (tensors and plain data: dict, list, tuple, str, int, float, bool, None)
    with a sha256 of its content under ``"checksum"``, atomically: an interrupted write leaves the
    previous checkpoint intact (:func:`fraccompile.fileio.atomic_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "checksum": state_checksum(state)}
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return path


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 of ``state`` without its ``"checksum"`` key: every key, plain value, and tensor's
    dtype, shape and bytes, in order. ``TypeError`` for anything else (loading it would need code
    to run)."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h, "state")
    return h.hexdigest()


def _digest(obj, h, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _digest(key, h, where)
            _digest(value, h, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for i, value in enumerate(obj):
            _digest(value, h, f"{where}[{i}]")
    elif obj is None or type(obj) in (bool, int, float, str, bytes, torch.dtype, torch.device):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint value {where} is a {type(obj).__module__}."
                        f"{type(obj).__qualname__}: a checkpoint holds tensors and plain data "
                        "only (dict, list, tuple, str, int, float, bool, None)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path``, loaded with
    ``torch.load(weights_only=True)`` (no code runs) and checked against its checksum.
    ``FileNotFoundError`` when there is no file; :class:`CheckpointError` naming the problem for
    an empty, truncated or damaged file, one that is not a checkpoint or holds Python objects, one
    of another version, and one with missing keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} {what}")

    if path.stat().st_size == 0:
        raise refuse("is empty (0 bytes): a write that never completed; resume from another one")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not names:
            raise refuse("is damaged or not a checkpoint (its bytes are not a torch "
                         "checkpoint's)") from None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
        except Exception:  # noqa: BLE001 - the names from the message do
            pass
        raise refuse(f"is refused: it holds Python objects ({', '.join(names)}) that only a "
                     "load able to run code could build; a fraccompile checkpoint holds tensors "
                     "and plain data") from None
    except Exception as e:  # noqa: BLE001 - every failure to read becomes one line
        if isinstance(e, EOFError) or is_zip:
            raise refuse(f"is truncated or damaged ({_first_line(e)})") from None
        raise refuse(f"is not a checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict) or "version" not in state:
        raise refuse(f"is not a fraccompile checkpoint (a {type(state).__name__} without a "
                     "version)")
    if state["version"] != CHECKPOINT_VERSION:
        raise refuse(f"has version {state['version']!r}; this fraccompile reads version "
                     f"{CHECKPOINT_VERSION}")
    checksum = state.pop("checksum", None)
    try:
        matches = checksum == state_checksum(state)
    except TypeError as e:
        raise refuse(f"is damaged ({e})") from None
    if not matches:
        raise refuse("is damaged: its content does not match the checksum it was written with "
                     "(bytes changed after it was saved)" if checksum else "has no checksum")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise refuse(f"lacks {', '.join(map(repr, missing))} (missing keys): not a checkpoint "
                     "fit() wrote")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


def check_model_state(path, saved: dict[str, Any], model_state: dict[str, Any],
                      exact: bool = True) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint whose model state does not fit
    ``model_state``: keys it lacks, keys the model does not have (with ``exact``) and tensors of
    another shape, in one line. ``exact=False`` checks a model before it is compiled (compiling
    adds keys, e.g. the activation ranges)."""
    missing = [k for k in model_state if k not in saved]
    extra = [k for k in saved if k not in model_state] if exact else []
    shapes = []
    for k in model_state:
        a, b = saved.get(k), model_state[k]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
                and not isinstance(b, torch.nn.parameter.UninitializedTensorMixin) \
                and a.shape != b.shape:
            shapes.append(f"{k}: {list(a.shape)} here {list(b.shape)}")
    if not (missing or extra or shapes):
        return

    def few(items):
        return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")

    parts = ([f"lacks {few(missing)}"] if missing else []) + \
        ([f"has unknown {few(extra)}"] if extra else []) + \
        ([f"has other shapes ({few(shapes)})"] if shapes else [])
    raise CheckpointError(f"checkpoint {path} does not fit this model: it {'; '.join(parts)} "
                          "(written for another model?)")


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's generator states as tensors and plain data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": py_gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


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
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient


class _Log:
    """Appends strict JSON lines; on resume, drops the lines written after the checkpoint's
    iteration (and a last line a kill cut short)."""

    def __init__(self, path: Path | None, resume_iter: int | None):
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is None:
            fileio.atomic_write(path, "")
        elif path.exists():
            try:
                records = fileio.read_jsonl(path)
            except ValueError as e:
                raise CheckpointError(f"cannot resume: {e}") from None
            kept = [rec for _, rec in records if isinstance(rec, dict)
                    and rec.get("iter", 0) <= resume_iter and rec.get("event") != "end"]
            fileio.atomic_write(path, "".join(_json_line(rec) for rec in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("ab") as f:  # one write: a kill leaves at most a torn last line
                f.write(_json_line(record).encode())


def _json_line(record: dict) -> str:
    return json.dumps(fileio.finite_json(record), allow_nan=False) + "\n"


def fit(model: FracModel, data, *, iters: int, schedule=None, optimizer=None, lr: float = 0.1,
        momentum: float = 0.9, weight_decay: float = 5e-4, lr_schedule: str = "cosine",
        eval_every: int = 100, loss_fn=default_loss, out_dir: str | Path | None = None,
        resume: str | Path | None = None, progress: bool = True, seed: int = 0,
        deterministic: bool = False, console: Console | None = None,
        model_name: str | None = None, stop_at: int | None = None, nonfinite: str = "skip",
        max_nonfinite: int = 10) -> FitResult:
    """Train ``model`` for ``iters`` iterations on ``data`` (see the module docstring).

    With ``out_dir``, writes ``log.jsonl`` and ``checkpoint.pt`` (after every period). With
    ``resume`` (a checkpoint path), continues exactly where that run stopped: same data order,
    RNG, optimizer, LR and schedule state, so precision switches (and, with ``deterministic``,
    losses) equal those of an uninterrupted run. ``stop_at`` ends the run early at that iteration
    (as an interruption would; the LR schedule still spans ``iters``).

    A step with a non-finite loss or gradient is skipped (``nonfinite="skip"``, at most
    ``max_nonfinite`` in a row) or stops the run at once (``"stop"``); either way it never reaches
    the weights or the checkpoint, and stopping raises :class:`NonFiniteError`.
    """
    if iters < 1 or eval_every < 1:
        raise ValueError("iters and eval_every must be at least 1")
    if nonfinite not in NONFINITE or max_nonfinite < 1:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)} and max_nonfinite at "
                         f"least 1 (got {nonfinite!r}, {max_nonfinite})")
    console = console or Console()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or was_deterministic)
    try:
        return _fit(model, data, iters, schedule, optimizer, lr, momentum, weight_decay,
                    lr_schedule, eval_every, loss_fn, out_dir, resume, progress, seed, console,
                    model_name, stop_at if stop_at is not None else iters,
                    1 if nonfinite == "stop" else max_nonfinite)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _restore(state, path, model, optimizer, scheduler) -> None:
    """Load a checkpoint's state into the run; a part that does not fit is one CheckpointError."""
    check_model_state(path, state["model"], model.state_dict())
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        model.precision.load_state_dict(state["precision"])
        if state["schedule"] is not None and hasattr(model.frac_schedule, "load_state_dict"):
            model.frac_schedule.load_state_dict(state["schedule"])
        model.frac_meter.load_state_dict(state["meter"])
        model.frac_iteration = int(state["iteration"])
        set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({_first_line(e)})") \
            from None


def _nonfinite(loss_value: float, model) -> str | None:
    """What is not finite in this step (the loss or the first such gradient), or None."""
    if not math.isfinite(loss_value):
        return f"loss ({loss_value})"
    named = [(n, p.grad._values() if p.grad.is_sparse else p.grad)
             for n, p in model.named_parameters() if p.grad is not None]
    if named and not bool(torch.stack([torch.isfinite(g).all() for _, g in named]).all()):
        return "gradient of " + next(n for n, g in named if not bool(torch.isfinite(g).all()))
    return None


def _skipped_step(model) -> None:
    """``frac_step`` for a skipped step: its compute is counted and the schedule moves on to the
    next iteration, but its loss is not fed to the schedule."""
    model.frac_meter.add(model.cost(), model._sbm_cost())
    model.frac_iteration += 1
    if model.frac_schedule is not None:
        model.frac_schedule.apply(model.precision, model.frac_iteration)


def _fit(model, data, iters, schedule, optimizer, lr, momentum, weight_decay, lr_schedule,
         eval_every, loss_fn, out_dir, resume, progress, seed, console, model_name,
         stop_at, max_bad) -> FitResult:
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
        _restore(state, resume, model, optimizer, scheduler)
        start = state["iteration"]
    run_dir = Path(out_dir) if out_dir is not None else None
    if run_dir is not None and run_dir.is_dir():  # temporary files of killed checkpoint writes
        fileio.remove_stale_temps(run_dir, "checkpoint.pt")
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
    skipped_total = state.get("skipped_steps", 0) if state is not None else 0
    saved_at = start if state is not None else None  # iteration of the last checkpoint written
    bad_in_row = 0
    period_loss, period_correct, period_count, period_steps, period_t = 0.0, 0, 0, 0, 0.0
    period_good = 0
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
                buffers = list(model.buffers())
                before = [b.clone() for b in buffers]  # put back if the step is skipped
                out = model(x)
                loss = loss_fn(out, y)
                total = loss
                if hasattr(model.frac_schedule, "regularizer"):  # DFQ / FracTrain cost term
                    total = loss + model.frac_schedule.regularizer(model)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                loss_value = loss.item()
                bad = _nonfinite(total.item(), model)
                if bad is None:
                    optimizer.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    for b, kept in zip(buffers, before):
                        b.copy_(kept)
                scheduler.step()
                if bad is None:
                    events = model.frac_step(loss_value)
                else:
                    events = []
                    _skipped_step(model)
                period_t += time.perf_counter() - t0
                period_steps += 1
                it += 1
                if bad is not None:
                    bad_in_row += 1
                    skipped_total += 1
                    if bad_in_row >= max_bad:
                        _stop(log, console, it, bad, bad_in_row, skipped_total,
                              run_dir / "checkpoint.pt" if run_dir else None, saved_at)
                else:
                    bad_in_row = 0
                    period_good += 1
                    period_loss += loss_value
                    period_correct += correct_count(out.detach(), y)
                    period_count += y.numel()
                gates = getattr(model, "frac_gates", None)
                if bad is None and gates is not None and gates.last:  # DFQ: each region's choice
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
                    (f"loss {loss_value:.3f}" if bad is None else f"skipped: non-finite {bad}")
                    + f"  a/w/g {prec['a']}/{prec['w']}/{prec['g']}  "
                    f"cost {meter.total / max(meter.fp32, 1e-9):.1%} of fp32"))
                if it % eval_every == 0 or it == iters:
                    record = {"event": "period", "iter": it, "epoch": it / steps,
                              "lr": optimizer.param_groups[0]["lr"],
                              "train_loss": period_loss / period_good if period_good else None,
                              "train_acc": period_correct / period_count if period_count else None,
                              **(evaluate(model, data.test_batches(), loss_fn)
                                 if hasattr(data, "test_batches") else
                                 {"test_loss": None, "test_acc": None}),
                              "precision": prec, "cp": model.cost().cp,
                              "cum_cost": meter.total, "cum_fp32": meter.fp32,
                              "cum_sbm": meter.sbm, "wall": time.perf_counter() - wall0,
                              "step_ms": 1000 * period_t / period_steps,
                              "skipped": period_steps - period_good}
                    if gate_shares:
                        record["gates"] = {r: (s / period_good).tolist()
                                           for r, s in gate_shares.items()}
                        record["gate_candidates"] = [list(p) for p in zip(gates.a, gates.g)]
                        gate_shares = {}
                    if gate_classes:
                        record["gate_classes"] = {r: c.round().int().tolist()
                                                  for r, c in gate_classes.items()}
                        gate_classes = {}
                    log.write(record)
                    result.periods.append(record)
                    loss_text = (f"{record['train_loss']:.4f}" if record["train_loss"] is not None
                                 else "-")
                    acc = record["test_acc"]
                    console.print(f"iter {it:6d}  train loss {loss_text}  "
                                  + (f"test acc {100 * acc:.2f}%  " if acc is not None else "")
                                  + f"a/w/g {prec['a']}/{prec['w']}/{prec['g']}  "
                                  f"cost {meter.total / meter.fp32:.1%} of fp32, "
                                  f"{meter.total / meter.sbm:.1%} of SBM"
                                  + (f"  ({record['skipped']} non-finite steps skipped)"
                                     if record["skipped"] else ""))
                    period_loss, period_correct, period_count, period_steps, period_t = 0, 0, 0, 0, 0.0
                    period_good = 0
                    if run_dir is not None:
                        _save_finite(model, optimizer, scheduler, it, time.perf_counter() - wall0,
                                     skipped_total, run_dir / "checkpoint.pt")
                        saved_at = it
                if it >= min(iters, stop_at):
                    break
    meter = model.frac_meter
    result.iterations = it
    result.skipped_steps = skipped_total
    if it < iters:  # stopped early: no "end" record, the run can be resumed
        return result
    result.final = {"event": "end", "iter": it,
                    "test_acc": result.periods[-1]["test_acc"] if result.periods else None,
                    "cum_cost": meter.total, "cum_fp32": meter.fp32, "cum_sbm": meter.sbm,
                    "wall": time.perf_counter() - wall0, "skipped_steps": skipped_total}
    log.write(result.final)
    return result


def _stop(log, console, it, bad, in_row, skipped_total, checkpoint, saved_at):
    """End the run after ``in_row`` non-finite steps in a row: a ``stopped`` record, then a
    NonFiniteError."""
    log.write({"event": "stopped", "iter": it, "reason": f"non-finite {bad}",
               "nonfinite_in_row": in_row, "skipped_steps": skipped_total})
    kept = (f"the last checkpoint, {checkpoint} (iteration {saved_at}), is kept and finite: "
            f"resume from it" if checkpoint is not None and saved_at is not None
            else "no checkpoint was written")
    raise NonFiniteError(f"training stopped at iteration {it}: {in_row} step(s) in a row with a "
                         f"non-finite {bad}, none applied to the weights; {kept} (lower the "
                         "learning rate or check the data first)")


def _save_finite(model, optimizer, scheduler, it, wall, skipped_total, path) -> None:
    """Write the checkpoint, unless a weight or buffer is not finite (then stop: the previous
    checkpoint stays)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"training stopped at iteration {it}: {name} is not finite "
                                 f"after the step; {path} was not overwritten (lower the "
                                 "learning rate)")
    state = _checkpoint(model, optimizer, scheduler, it, wall)
    state["skipped_steps"] = skipped_total
    save_checkpoint(state, path)


def _checkpoint(model: FracModel, optimizer, scheduler, iteration: int, wall: float) -> dict:
    sched = model.frac_schedule
    return {"version": CHECKPOINT_VERSION, "iteration": iteration, "wall": wall,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "precision": model.precision.state_dict(),
            "schedule": sched.state_dict() if hasattr(sched, "state_dict") else None,
            "meter": model.frac_meter.state_dict(), "rng": rng_state(),
            "config": model.frac_config.to_dict()}
