"""What :func:`fraccompile.train.fit` is asked to do: :class:`FitConfig`, a validated dataclass,
and the optimizer and learning-rate schedule it builds from one.

>>> cfg = FitConfig(iters=5000, eval_every=100, lr=0.1, out_dir="runs/pfq")
>>> fit(fmodel, data, cfg, schedule=PFQ(eval_every=100))
>>> fit(fmodel, data, iters=5000, out_dir="runs/pfq")          # the same, as keywords
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

LR_SCHEDULES = ("cosine", "piecewise", "constant")
NONFINITE = ("skip", "stop")
OPTIMIZERS = ("sgd", "adamw")
PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class FitConfig:
    """One training run.

    * ``iters``: training iterations; ``eval_every``: iterations per period (log record, test
      evaluation, checkpoint).
    * The optimizer ``fit`` builds when it is given none: ``optimizer`` (``sgd``: Nesterov
      momentum when ``momentum > 0``; ``adamw``), ``lr``, ``momentum`` (SGD), ``weight_decay``
      (None: 5e-4 for SGD, 0.01 for AdamW); ``lr_schedule``: ``cosine``, ``piecewise`` (x0.1 at
      50% and 75%) or ``constant``, over ``iters``.
    * ``out_dir``: where ``log.jsonl``, ``checkpoint.pt`` and (with ``run_info``) ``run.json``
      go; ``resume``: a checkpoint to continue from exactly; ``stop_at``: end early at that
      iteration, as an interruption would.
    * ``seed``, ``deterministic`` (torch's deterministic algorithms).
    * ``nonfinite`` (``skip`` or ``stop``) and ``max_nonfinite``: what a NaN/inf step does.
    * ``distributed``: ``auto`` (DDP when started by torchrun or inside a process group of more
      than one process), ``none``, ``ddp`` or ``fsdp`` (FSDP2's ``fully_shard``);
      ``timeout``: seconds a collective waits for the other processes before the run stops
      (used when ``fit`` starts the process group); ``ddp_options``: keywords for
      ``DistributedDataParallel``. See docs/distributed.md.
    * ``progress``: the progress bar; ``model_name``: the model's name in the log;
      ``run_info``: plain data written with the configs to ``out_dir/run.json`` on a new run.
    """

    iters: int
    eval_every: int = 100
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_schedule: str = "cosine"
    out_dir: str | Path | None = None
    resume: str | Path | None = None
    stop_at: int | None = None
    seed: int = 0
    deterministic: bool = False
    nonfinite: str = "skip"
    max_nonfinite: int = 10
    distributed: str = "auto"
    timeout: float = 600.0
    ddp_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    model_name: str | None = None
    run_info: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 1 or self.eval_every < 1:
            raise ConfigError(
                f"iters and eval_every must be at least 1 (got {self.iters!r}, {self.eval_every!r})"
            )
        if self.nonfinite not in NONFINITE or self.max_nonfinite < 1:
            raise ConfigError(
                f"nonfinite must be one of {', '.join(NONFINITE)} and max_nonfinite "
                f"at least 1 (got {self.nonfinite!r}, {self.max_nonfinite})"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr schedule {self.lr_schedule!r}: choose {', '.join(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.distributed not in PARALLEL:
            raise ConfigError(f"distributed {self.distributed!r}: choose {', '.join(PARALLEL)}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout {self.timeout!r} must be a positive number of seconds")
        if self.stop_at is not None and self.stop_at < 0:
            raise ConfigError(f"stop_at {self.stop_at} must be >= 0")

    @property
    def end(self) -> int:
        """The iteration this call stops at."""
        return min(self.iters, self.stop_at if self.stop_at is not None else self.iters)

    def replace(self, **changes) -> FitConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings), e.g. for ``run.json``."""
        out = dataclasses.asdict(self)
        for key in ("out_dir", "resume"):
            if out[key] is not None:
                out[key] = str(out[key])
        return out


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``params``."""
    if cfg.optimizer == "adamw":
        wd = 0.01 if cfg.weight_decay is None else cfg.weight_decay
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
    wd = 5e-4 if cfg.weight_decay is None else cfg.weight_decay
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.momentum > 0
    )


def lr_lambda(kind: str, iters: int) -> Callable[[int], float]:
    """The LR factor at each iteration of the ``kind`` schedule over ``iters``."""
    if kind == "cosine":
        return lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))
    if kind == "piecewise":  # x0.1 at 50% and 75% of training, as the ResNet CIFAR recipe
        return lambda i: 0.1 ** ((i >= iters // 2) + (i >= 3 * iters // 4))
    if kind == "constant":
        return lambda i: 1.0
    raise ConfigError(f"unknown lr schedule {kind!r}: choose {', '.join(LR_SCHEDULES)}")
