"""One period of :func:`fraccompile.train.fit` (``eval_every`` iterations): what it counts step by
step (:class:`Period`), what the processes of a distributed run agree on at its end, the
evaluation, and the ``period`` record of the run log (:mod:`fraccompile.runlog`) with its console
line.

:func:`default_loss`, :func:`correct_count`, :func:`evaluate` and :func:`schedule_precision` are
usable on their own (also as ``fraccompile.train.evaluate`` and so on).
"""

from __future__ import annotations

from itertools import islice

import torch
import torch.nn.functional as F

from . import distributed
from .control.schedules import as_schedule
from .model import FracModel


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (classifiers and language models alike)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def correct_count(output: torch.Tensor, target: torch.Tensor) -> int:
    return int((output.argmax(-1) == target).sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, test_batches, loss_fn=default_loss, ctx: distributed.Context | None = None
) -> dict[str, float]:
    """Mean loss and top-1 accuracy over ``test_batches`` in eval mode. With a distributed
    ``ctx`` (DDP), each process takes every ``world_size``-th batch and the sums are added up."""
    was_training = model.training
    model.eval()
    shard = ctx is not None and ctx.parallel == "ddp"
    if shard:
        test_batches = islice(test_batches, ctx.rank, None, ctx.world_size)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for x, y in test_batches:
        out = model(x)
        n = y.numel()
        sums += torch.tensor([float(loss_fn(out, y)) * n, correct_count(out, y), n], dtype=torch.float64)
    model.train(was_training)
    if shard:
        ctx.sum_(sums)
    loss_sum, correct, count = sums.tolist()
    if not count:
        return {"test_loss": None, "test_acc": None}
    return {"test_loss": loss_sum / count, "test_acc": correct / count}


def schedule_precision(model: FracModel, ctx: distributed.Context | None = None) -> dict:
    """The precision the schedule runs at now (or the most common one among the sites); DFQ:
    the share-weighted mean bits of the gates' latest choices (over all processes with a
    distributed ``ctx``)."""
    gates = getattr(model, "frac_gates", None)
    if gates is not None and gates.last:
        rows = [r for r in model.cost().rows if not isinstance(r.a, int)]
        if rows:
            bits = [sum(getattr(r, k) for r in rows) / len(rows) for k in "awg"]
            if ctx is not None:
                bits = ctx.mean(bits)
            return {k: round(v, 2) for k, v in zip("awg", bits)}
    prec = as_schedule(model.frac_schedule).precision_at(model.frac_iteration)
    if prec is None:
        values = [p for _, p in model.precision.items()]
        prec = max(set(values), key=values.count) if values else (0, 0, 0)
    a, w, g = prec
    return {"a": a, "w": w, "g": g}


class Period:
    """What ``fit`` counts between two ``period`` records: every step's time, and for the steps
    that were applied (not skipped as non-finite) their loss, correct predictions and, with DFQ
    gates, each region's choices."""

    def __init__(self):
        self.loss, self.good, self.steps, self.seconds = 0.0, 0, 0, 0.0
        self.hits = torch.zeros(2, dtype=torch.float64)  # correct, count
        self.gate_shares: dict[str, torch.Tensor] = {}
        self.gate_classes: dict[str, torch.Tensor] = {}  # per region: (classes, candidates)

    def count_step(self, seconds: float) -> None:
        """A step, applied or skipped, that took ``seconds``."""
        self.seconds += seconds
        self.steps += 1

    def count_applied(self, loss_value: float, out: torch.Tensor, y: torch.Tensor, gates) -> None:
        """An applied step: its loss, its hits on the batch and ``gates``' choices (the model's
        ``frac_gates``, or None)."""
        self.good += 1
        self.loss += loss_value
        self.hits += torch.tensor([correct_count(out.detach(), y), y.numel()], dtype=torch.float64)
        self._count_gates(gates, out, y)

    def _count_gates(self, gates, out, y) -> None:
        """DFQ: each region's choice, as shares of the batch and per class."""
        if gates is None or not gates.last:
            return
        per_class = out.dim() == 2 and y.dim() == 1 and y.numel() == out.shape[0]
        for region in gates.last:
            share = gates.fractions(region).detach().cpu().double()
            self.gate_shares[region] = self.gate_shares.get(region, 0) + share
            if per_class:  # classification: which candidate each class's samples chose
                onehot = gates.last[region].onehot.detach().double().cpu()
                counts = self.gate_classes.get(region)
                if counts is None:
                    counts = torch.zeros(out.shape[1], onehot.shape[1], dtype=torch.float64)
                self.gate_classes[region] = counts.index_add_(0, y.cpu(), onehot)

    def agree(self, model: FracModel, ctx: distributed.Context) -> None:
        """At the end of the period of a distributed run: the cost meters become their mean, the
        hits and the gates' class counts their sum and the gate shares their mean over the
        processes, and every process takes rank 0's buffers."""
        _agree_meter(model, ctx)
        ctx.sum_(self.hits)
        for table, mean in ((self.gate_shares, True), (self.gate_classes, False)):
            for region in sorted(table):
                ctx.sum_(table[region])
                if mean:
                    table[region] /= ctx.world_size
        _broadcast_buffers(model, ctx)  # rank 0's BatchNorm statistics (as DDP's forward)

    def record(
        self,
        it: int,
        *,
        epoch: float,
        lr: float,
        test: dict,
        precision: dict,
        cp: float,
        meter,
        wall: float,
        gates,
    ) -> dict:
        """The ``period`` record of the run log for the period that ends at iteration ``it``
        (``test``: :func:`evaluate`'s result; ``meter``: the model's cost meter; ``gates``: its
        ``frac_gates`` or None)."""
        correct, count = self.hits.tolist()
        record = {
            "event": "period",
            "iter": it,
            "epoch": epoch,
            "lr": lr,
            "train_loss": self.loss / self.good if self.good else None,
            "train_acc": correct / count if count else None,
            **test,
            "precision": precision,
            "cp": cp,
            "cum_cost": meter.total,
            "cum_fp32": meter.fp32,
            "cum_sbm": meter.sbm,
            "wall": wall,
            "step_ms": 1000 * self.seconds / self.steps,
            "skipped": self.steps - self.good,
        }
        if self.gate_shares:
            record["gates"] = {r: (s / self.good).tolist() for r, s in self.gate_shares.items()}
            record["gate_candidates"] = [list(p) for p in zip(gates.a, gates.g)]
        if self.gate_classes:
            record["gate_classes"] = {r: c.round().int().tolist() for r, c in self.gate_classes.items()}
        return record


def period_line(record: dict) -> str:
    """The console's line for a ``period`` record."""
    prec = record["precision"]
    loss_text = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
    acc = record["test_acc"]
    cost, fp32, sbm = record["cum_cost"], record["cum_fp32"], record["cum_sbm"]
    return (
        f"iter {record['iter']:6d}  train loss {loss_text}  "
        + (f"test acc {100 * acc:.2f}%  " if acc is not None else "")
        + f"a/w/g {prec['a']}/{prec['w']}/{prec['g']}  "
        f"cost {cost / fp32:.1%} of fp32, {cost / sbm:.1%} of SBM"
        + (f"  ({record['skipped']} non-finite steps skipped)" if record["skipped"] else "")
    )


def _agree_meter(model: FracModel, ctx: distributed.Context) -> None:
    """Every process's cost meter becomes their mean: the cost of the global batch (each
    process counted its own gates' choices)."""
    meter = model.frac_meter
    state = meter.state_dict()
    keys = sorted(k for k, v in state.items() if isinstance(v, (int, float)))
    means = ctx.mean([float(state[k]) for k in keys])
    meter.load_state_dict(
        {k: (type(state[k])(round(v)) if isinstance(state[k], int) else v) for k, v in zip(keys, means)}
    )


def _broadcast_buffers(model, ctx: distributed.Context) -> None:
    """Rank 0's buffers in every process (what DDP does before each forward)."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, src=0)
