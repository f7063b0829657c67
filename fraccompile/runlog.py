"""The run log, ``RUN_DIR/log.jsonl``: its schema, its writer (:class:`LogWriter`, used by
:func:`fraccompile.train.fit`) and its reader (:func:`read_log`, used by the reports).

One strict-JSON object per line (a value that is not finite is ``null``), keyed by ``event``:

* ``start`` — ``time``, ``model``, ``schedule`` (one line), ``schedule_kind``, ``config`` (the
  FracConfig), ``iters``, ``eval_every``, ``batch_size`` (per process), ``world_size`` (processes
  that trained; 1 without torch.distributed), ``parallel`` (``none``, ``ddp`` or ``fsdp``),
  ``sites`` (name, macs, full_precision) and ``cost_per_step`` (``fp32`` and ``sbm``: one step's
  cost at fp32 and at static 8/8/8).
* ``period`` — every ``eval_every`` iterations: ``iter``, ``epoch``, ``lr``, ``train_loss``,
  ``train_acc``, ``test_loss``, ``test_acc``, ``precision`` (``{"a", "w", "g"}``; DFQ logs the
  share-weighted mean bits, floats), ``cp``, ``cum_cost``, ``cum_fp32``, ``cum_sbm``, ``wall``,
  ``step_ms``, ``skipped``; DFQ/FracTrain runs add ``gates`` (per region, the share of the
  period's samples that chose each candidate), ``gate_candidates`` (each candidate's ``[a, g]``)
  and, for classification, ``gate_classes`` (per region and class, how many samples chose each
  candidate). In a distributed run every number is over all processes (losses and accuracies of
  the global batch, gate shares and class counts summed over ranks).
* ``turning_point`` — ``iter``, ``index``, ``eps``, ``diffs``, ``normalizer`` and the new
  ``precision`` (PFQ) or ``target_cp`` (FracTrain).
* ``resume`` — ``iter`` (the checkpoint's): records after it were dropped from the file.
* ``stopped`` — ``iter``, ``reason`` (non-finite steps, a process that died), and
  ``nonfinite_in_row`` / ``skipped_steps`` for non-finite steps.
* ``end`` — ``iter``, ``test_acc``, ``cum_cost``, ``cum_fp32``, ``cum_sbm``, ``wall``,
  ``skipped_steps``.

Costs are in fp32-MAC units. Readers ignore unknown events and keys (newer writers), and a log may
be unfinished (no ``end``). A kill can cut only the last line: the writer appends each record in
one write, the reader skips a torn last line, and a resumed run drops it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fileio
from .errors import FracCompileError

LOG_NAME = "log.jsonl"
EVENTS = ("start", "period", "turning_point", "resume", "stopped", "end")


# -- writing ---------------------------------------------------------------------------------------
class LogWriter:
    """Appends strict JSON lines to ``path`` (nothing when ``path`` is None). A new run empties
    the file; a resumed one (``resume_iter``) keeps the records up to that iteration and drops the
    later ones, a previous ``end`` and a torn last line. ``error`` is the exception class a log
    that cannot be read raises (the caller's: a checkpoint problem when resuming)."""

    def __init__(self, path: Path | None, resume_iter: int | None, error: type[Exception] = ValueError):
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
                raise error(f"cannot resume: {e}") from None
            kept = [
                rec
                for _, rec in records
                if isinstance(rec, dict) and rec.get("iter", 0) <= resume_iter and rec.get("event") != "end"
            ]
            fileio.atomic_write(path, "".join(json_line(rec) for rec in kept))

    def write(self, record: dict) -> None:
        if record.get("event") not in EVENTS:
            raise ValueError(f"log record event {record.get('event')!r}: one of {EVENTS}")
        if self.path is not None:
            with self.path.open("ab") as f:  # one write: a kill leaves at most a torn last line
                f.write(json_line(record).encode())


def json_line(record: dict) -> str:
    return json.dumps(fileio.finite_json(record), allow_nan=False) + "\n"


# -- reading ---------------------------------------------------------------------------------------
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
    def world_size(self) -> int:
        """Processes that trained the run (1 for a log written before distributed training)."""
        return int(self.start.get("world_size") or 1)

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
    try:
        records = fileio.read_jsonl(path)  # skips a torn last line (killed, or being written)
    except ValueError as err:
        raise LogError(str(err)) from None
    log: RunLog | None = None
    for n, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
            raise LogError(f'{path}:{n}: expected a JSON object with an "event" key')
        event = rec["event"]
        if event == "start":
            log = RunLog(path, rec)
            continue
        if event not in ("period", "turning_point", "resume", "end"):
            continue  # "stopped" (not drawn) and unknown events (newer writers)
        if log is None:
            raise LogError(f'{path}:{n}: {event!r} event before the "start" event')
        if not isinstance(rec.get("iter"), int):
            raise LogError(f'{path}:{n}: {event!r} event without an integer "iter"')
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
        raise LogError(f'{path}: empty log (no "start" event)')
    return log
