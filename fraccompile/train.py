"""Training helpers: the three-line hook for your own loop, and ``fit`` for a complete one.

Your own loop::

    fmodel = fraccompile.compile(model, x).use_schedule(PFQ(eval_every=100))
    ...  loss.backward(); optimizer.step()
    fmodel.frac_step(loss)          # cost accounting + schedule; returns turning-point events

``fit(fmodel, data, FitConfig(iters=...))`` (or ``fit(fmodel, data, iters=...)``) runs the loop:
any optimizer (SGD by default), an LR schedule, periodic evaluation (what a period counts and
logs: :mod:`fraccompile.fitperiod`), a rich progress bar, a JSONL log (:mod:`fraccompile.runlog`),
atomic checkpoints and exact resume (:mod:`fraccompile.checkpoint`). Under ``torchrun`` it trains
with DistributedDataParallel (or FSDP2), every precision decision agreed between the processes
(:mod:`fraccompile.distributed`, docs/distributed.md).

``data`` is any object with ``batches(epoch, start=0)`` (the epoch's training batches, starting at
batch ``start``, the same on every call), ``steps_per_epoch`` and optionally ``test_batches()``
and, for distributed runs, ``shard(rank, world_size)`` (see :mod:`fraccompile.data`).

Non-finite steps: a step whose loss or gradient is NaN or infinite changes nothing (no optimizer
step; buffers such as BatchNorm's running statistics are restored), is counted (``skipped``) and
moves on to the next batch; ``max_nonfinite`` such steps in a row (or the first one, with
``nonfinite="stop"``) stop the run with :class:`NonFiniteError`, leaving the last checkpoint, which
is always finite, to resume from.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import distributed, fileio
from .checkpoint import (  # noqa: F401
    CHECKPOINT_KEYS,
    CHECKPOINT_VERSION,
    CheckpointError,
    check_model_state,
    first_line,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_checksum,
)
from .control.schedules import Schedule, as_schedule
from .errors import FracCompileError
from .fitconfig import LR_SCHEDULES, NONFINITE, FitConfig, lr_lambda, make_optimizer  # noqa: F401
from .fitperiod import (  # noqa: F401  (usable on their own, from here as before)
    Period,
    correct_count,
    default_loss,
    evaluate,
    period_line,
    schedule_precision,
)
from .model import FracModel
from .runlog import LogWriter


class NonFiniteError(FracCompileError):
    """Training stopped on non-finite losses or gradients (see the module docstring)."""


@dataclass
class FitResult:
    iterations: int
    periods: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient


# -- the loop ---------------------------------------------------------------------------------------
def fit(
    model: FracModel,
    data,
    config: FitConfig | None = None,
    *,
    schedule=None,
    optimizer=None,
    loss_fn=default_loss,
    console: Console | None = None,
    **options,
) -> FitResult:
    """Train ``model`` on ``data`` as ``config`` says (a :class:`FitConfig`; keyword ``options``
    are its fields, and replace those of ``config``). See the module docstring.

    ``schedule``: a :class:`~fraccompile.control.Schedule` (or an object with ``apply`` and
    ``observe``), else the model's own. ``optimizer``: a ``torch.optim.Optimizer`` over the
    model's parameters, or a function from the parameters to one (needed with FSDP2, which
    replaces the parameters), else the one ``config`` names.

    With ``out_dir``, writes ``log.jsonl`` and ``checkpoint.pt`` (after every period). With
    ``resume`` (a checkpoint path), continues exactly where that run stopped: same data order,
    RNG, optimizer, LR and schedule state, so precision switches (and, with ``deterministic``,
    losses) equal those of an uninterrupted run. ``stop_at`` ends the run early at that iteration
    (as an interruption would; the LR schedule still spans ``iters``).

    A step with a non-finite loss or gradient is skipped (``nonfinite="skip"``, at most
    ``max_nonfinite`` in a row) or stops the run at once (``"stop"``); either way it never reaches
    the weights or the checkpoint, and stopping raises :class:`NonFiniteError`. In a distributed
    run, a process that dies or hangs stops the others with
    :class:`~fraccompile.distributed.DistributedError`, the last checkpoint intact.
    """
    cfg = FitConfig(**options) if config is None else config.replace(**options)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic or was_deterministic)
    ctx = distributed.setup(cfg.distributed, cfg.timeout)
    try:
        if console is None or not ctx.is_main:  # only rank 0 prints
            console = Console(quiet=not ctx.is_main)
        run = _Run(model, data, cfg, ctx, schedule, optimizer, loss_fn, console)
        return run.run()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        distributed.teardown(ctx)


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 draws from ``seed`` (as one process would); the others from their own streams."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint32)[0])


class _Run:
    """The state of one ``fit`` call; :meth:`run` is the loop."""

    def __init__(
        self,
        model: FracModel,
        data,
        cfg: FitConfig,
        ctx: distributed.Context,
        schedule,
        optimizer,
        loss_fn,
        console: Console,
    ):
        self.model, self.cfg, self.ctx, self.loss_fn, self.console = model, cfg, ctx, loss_fn, console
        seed = _rank_seed(cfg.seed, ctx.rank)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.data = distributed.shard_data(data, ctx)
        if ctx.active and getattr(model, "cuda_graphs", None) is not None:
            raise FracCompileError(
                "FracConfig.cuda_graphs = True is not supported in distributed training yet: DDP "
                "all-reduces gradients and FSDP2 swaps parameter storage inside the backward, which "
                "the graphed step does not hold; compile with cuda_graphs=False for torchrun"
            )
        if isinstance(optimizer, torch.optim.Optimizer) and ctx.parallel == "fsdp":
            raise FracCompileError(
                "with FSDP2 pass optimizer as a function of the parameters "
                "(fully_shard replaces them), or let fit build it"
            )
        self.module = distributed.wrap(model, ctx, **cfg.ddp_options)  # what forward runs on
        if optimizer is None:
            optimizer = make_optimizer(model.parameters(), cfg)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model.parameters())
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.iters))
        model.use_schedule(as_schedule(schedule if schedule is not None else model.frac_schedule))
        self.sched: Schedule = model.frac_schedule
        self.run_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        self.checkpoint = self.run_dir / "checkpoint.pt" if self.run_dir else None
        state = self._load(cfg.resume) if cfg.resume is not None else None
        self.start = state["iteration"] if state is not None else 0
        main_dir = self.run_dir if ctx.is_main else None
        if main_dir is not None and main_dir.is_dir():  # temporaries of killed checkpoint writes
            fileio.remove_stale_temps(main_dir, "checkpoint.pt")
        self.log = LogWriter(
            main_dir / "log.jsonl" if main_dir else None,
            self.start if state is not None else None,
            CheckpointError,
        )
        if state is None:
            self._write_run_json()
            self.log.write(self._start_record())
        else:
            self.log.write({"event": "resume", "iter": self.start})
        self.result = FitResult(iterations=self.start, run_dir=self.run_dir)
        self.wall0 = time.perf_counter() - (state["wall"] if state is not None else 0.0)
        self.skipped_total = state.get("skipped_steps", 0) if state is not None else 0
        self.saved_at = self.start if state is not None else None  # the last checkpoint's iter
        self.bad_in_row = 0
        self._new_period()

    # -- setting up --------------------------------------------------------------------------------
    def _load(self, path) -> dict:
        """The checkpoint at ``path`` restored into this run (rank 0 reads it, every process
        gets it); a problem is the same error in every process."""
        ctx = self.ctx
        state, problem = None, None
        if ctx.is_main:
            try:
                state = load_checkpoint(path)
            except (FileNotFoundError, CheckpointError) as e:
                problem = (type(e).__name__, str(e))
        if ctx.active:
            state, problem = ctx.broadcast((state, problem))
        if problem is not None:
            kind, text = problem
            raise (FileNotFoundError if kind == "FileNotFoundError" else CheckpointError)(text)
        written = (int(state.get("world_size", 1)), state.get("parallel", "none"))
        if written[0] != ctx.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by a run of {written[0]} process(es) and this "
                f"run has {ctx.world_size}: resume it with {written[0]} (each process's batches "
                "and generators depend on the number of processes, so another number would not "
                "continue the same run)"
            )
        if (written[1] == "fsdp") != (ctx.parallel == "fsdp"):
            raise CheckpointError(
                f"checkpoint {path} was written with parallel={written[1]!r}: "
                f"resume it with distributed={written[1]!r}"
            )
        self._restore(state, path)
        return state

    def _restore(self, state, path) -> None:
        model = self.model
        check_model_state(path, state["model"], model.state_dict())
        try:
            distributed.load_full_state(model, self.optimizer, state["model"], state["optimizer"], self.ctx)
            self.scheduler.load_state_dict(state["lr_scheduler"])
            model.precision.load_state_dict(state["precision"])
            if state["schedule"] is not None:
                self.sched.load_state_dict(state["schedule"])
            model.frac_meter.load_state_dict(state["meter"])
            model.frac_iteration = int(state["iteration"])
            ranks = state.get("rng_ranks")
            set_rng_state(ranks[self.ctx.rank] if ranks else state["rng"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run ({first_line(e)})") from None

    def _write_run_json(self) -> None:
        if self.cfg.run_info is None or self.run_dir is None or not self.ctx.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fit_cfg = {k: v for k, v in self.cfg.to_dict().items() if k != "run_info"}
        fileio.atomic_write(
            self.run_dir / "run.json",
            json.dumps(
                {
                    **self.cfg.run_info,
                    "fit": fit_cfg,
                    "world_size": self.ctx.world_size,
                    "config": self.model.frac_config.to_dict(),
                },
                indent=1,
                default=str,
            ),
        )

    def _start_record(self) -> dict:
        model, sched, cfg = self.model, self.sched, self.cfg
        return {
            "event": "start",
            "time": time.time(),
            "model": cfg.model_name or type(model).__name__,
            "schedule": sched.describe(),
            "schedule_kind": sched.kind,
            "config": model.frac_config.to_dict(),
            "iters": cfg.iters,
            "eval_every": cfg.eval_every,
            "batch_size": getattr(self.data, "batch_size", None),
            "world_size": self.ctx.world_size,
            "parallel": self.ctx.parallel,
            "sites": [
                {"name": s.name, "macs": s.macs, "full_precision": s.full_precision} for s in model.sites
            ],
            "cost_per_step": {"fp32": model.cost().fp32_total, "sbm": model.sbm_cost().total},
        }

    def _new_period(self) -> None:
        self.period = Period()  # what the steps until the next period record count

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> FitResult:
        it = self.start
        try:
            with distributed.agreed_ranges(self.ctx):
                it = self._loop()
        except Exception as e:
            if not (self.ctx.active and distributed.is_peer_failure(e)):
                raise
            err = distributed.peer_failure(
                e,
                self.ctx,
                self.model.frac_iteration,
                str(self.checkpoint) if self.checkpoint else None,
                self.saved_at,
            )
            self.log.write({"event": "stopped", "iter": self.model.frac_iteration, "reason": str(err)})
            raise err from None
        return self._finish(it)

    def _loop(self) -> int:
        cfg, data = self.cfg, self.data
        steps = data.steps_per_epoch
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (cfg.progress and self.ctx.is_main),
            transient=True,
        )
        it = self.start
        with bar:
            task = bar.add_task("train", total=cfg.iters, completed=it, status="")
            self.module.train()
            while it < cfg.end:
                epoch, offset = divmod(it, steps)
                for x, y in islice(data.batches(epoch, start=offset), steps - offset):
                    it += 1
                    status = self._step(x, y, it)
                    bar.update(task, completed=it, status=status)
                    if it % cfg.eval_every == 0 or it == cfg.iters:
                        self._period(it)
                    if it >= cfg.end:
                        break
        return it

    def _step(self, x, y, it: int) -> str:
        """One iteration (the ``it``-th); returns the progress bar's status."""
        model, ctx = self.model, self.ctx
        t0 = time.perf_counter()
        buffers = list(model.buffers())
        before = [b.clone() for b in buffers]  # put back if the step is skipped
        out = self.module(x)
        loss = self.loss_fn(out, y)
        reg = self.sched.regularizer(model, ctx.mean_one if ctx.active else None)
        total = loss if reg is None else loss + reg
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        loss_value, total_value = loss.item(), total.item()
        bad = _nonfinite(total_value, model)
        if ctx.active:  # the global batch's loss (PFQ's indicator) and one decision for all
            loss_value, total_value, flagged = ctx.mean([loss_value, total_value, bad is not None])
            if bad is None and flagged > 0:
                bad = f"loss or gradient in another process ({total_value})"
        if bad is None:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            for b, kept in zip(buffers, before):
                b.copy_(kept)
        self.scheduler.step()
        if bad is None:
            events = model.frac_step(loss_value)
        else:
            events = []
            _skipped_step(model)
        self.period.count_step(time.perf_counter() - t0)
        if bad is not None:
            self.bad_in_row += 1
            self.skipped_total += 1
            if self.bad_in_row >= (1 if self.cfg.nonfinite == "stop" else self.cfg.max_nonfinite):
                self._stop(it, bad)
        else:
            self.bad_in_row = 0
            self.period.count_applied(loss_value, out, y, getattr(model, "frac_gates", None))
        for event in events:
            event = {**event, "iter": it}
            self.log.write(event)
            self.result.events.append(event)
            change = (
                f"target cp {100 * event['target_cp']:.2f}%"
                if "target_cp" in event
                else f"precision {event.get('precision')}"
            )
            self.console.print(f"iter {it}: turning point {event.get('index', '')} -> {change}")
        prec = schedule_precision(model)
        meter = model.frac_meter
        return (
            (f"loss {loss_value:.3f}" if bad is None else f"skipped: non-finite {bad}")
            + f"  a/w/g {prec['a']}/{prec['w']}/{prec['g']}  "
            f"cost {meter.total / max(meter.fp32, 1e-9):.1%} of fp32"
        )

    def _period(self, it: int) -> None:
        """The period that ends at ``it``: agree, evaluate, log, checkpoint."""
        model, ctx, period = self.model, self.ctx, self.period
        if ctx.active:
            period.agree(model, ctx)
        prec = schedule_precision(model, ctx if ctx.active else None)
        cp = model.cost().cp
        if ctx.active:
            cp = ctx.mean_one(cp)
        test = (
            evaluate(
                self.module if ctx.parallel == "fsdp" else model,
                self.data.test_batches(),
                self.loss_fn,
                ctx if ctx.active else None,
            )
            if hasattr(self.data, "test_batches")
            else {"test_loss": None, "test_acc": None}
        )
        record = period.record(
            it,
            epoch=it / self.data.steps_per_epoch,
            lr=self.optimizer.param_groups[0]["lr"],
            test=test,
            precision=prec,
            cp=cp,
            meter=model.frac_meter,
            wall=time.perf_counter() - self.wall0,
            gates=getattr(model, "frac_gates", None),
        )
        self.log.write(record)
        self.result.periods.append(record)
        self.console.print(period_line(record))
        self._new_period()
        if self.checkpoint is not None:
            self._save(it)
            self.saved_at = it

    def _finish(self, it: int) -> FitResult:
        meter, result = self.model.frac_meter, self.result
        result.iterations = it
        result.skipped_steps = self.skipped_total
        if it < self.cfg.iters:  # stopped early: no "end" record, the run can be resumed
            return result
        result.final = {
            "event": "end",
            "iter": it,
            "test_acc": result.periods[-1]["test_acc"] if result.periods else None,
            "cum_cost": meter.total,
            "cum_fp32": meter.fp32,
            "cum_sbm": meter.sbm,
            "wall": time.perf_counter() - self.wall0,
            "skipped_steps": self.skipped_total,
        }
        self.log.write(result.final)
        return result

    # -- stopping and saving -----------------------------------------------------------------------
    def _stop(self, it: int, bad: str):
        """End the run after non-finite steps: a ``stopped`` record, then NonFiniteError."""
        self.log.write(
            {
                "event": "stopped",
                "iter": it,
                "reason": f"non-finite {bad}",
                "nonfinite_in_row": self.bad_in_row,
                "skipped_steps": self.skipped_total,
            }
        )
        kept = (
            f"the last checkpoint, {self.checkpoint} (iteration {self.saved_at}), is kept and "
            "finite: resume from it"
            if self.checkpoint is not None and self.saved_at is not None
            else "no checkpoint was written"
        )
        raise NonFiniteError(
            f"training stopped at iteration {it}: {self.bad_in_row} step(s) in "
            f"a row with a non-finite {bad}, none applied to the weights; {kept} "
            "(lower the learning rate or check the data first)"
        )

    def _save(self, it: int) -> None:
        """Write the checkpoint (rank 0), unless a weight or buffer is not finite (then stop:
        the previous checkpoint stays)."""
        model, ctx = self.model, self.ctx
        bad = next(
            (
                name
                for name, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_floating_point() and not bool(torch.isfinite(distributed.local_tensor(t)).all())
            ),
            None,
        )
        if ctx.active and ctx.any_(bad is not None) and bad is None:
            bad = "a weight in another process"
        if bad is not None:
            raise NonFiniteError(
                f"training stopped at iteration {it}: {bad} is not finite "
                f"after the step; {self.checkpoint} was not overwritten (lower "
                "the learning rate)"
            )
        model_state, optim_state = distributed.full_state(model, self.optimizer, ctx)
        rngs = ctx.gather(rng_state()) if ctx.active else None
        if not ctx.is_main:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "iteration": it,
            "wall": time.perf_counter() - self.wall0,
            "model": model_state,
            "optimizer": optim_state,
            "lr_scheduler": self.scheduler.state_dict(),
            "precision": model.precision.state_dict(),
            "schedule": self.sched.state_dict(),
            "meter": model.frac_meter.state_dict(),
            "rng": rng_state(),
            "config": model.frac_config.to_dict(),
            "skipped_steps": self.skipped_total,
        }
        if ctx.active:
            state.update(world_size=ctx.world_size, parallel=ctx.parallel, rng_ranks=rngs)
        save_checkpoint(state, self.checkpoint)


def _nonfinite(loss_value: float, model) -> str | None:
    """What is not finite in this step (the loss or the first such gradient), or None."""
    if not math.isfinite(loss_value):
        return f"loss ({loss_value})"
    named = [(n, distributed.local_tensor(p.grad)) for n, p in model.named_parameters() if p.grad is not None]
    named = [(n, g._values() if g.is_sparse else g) for n, g in named]
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
