"""Precision schedules: what drives the :class:`PrecisionController` over training time.

Every schedule is a :class:`Schedule`: it overrides ``apply`` (and whatever else it needs) and
inherits defaults for the rest::

    apply(controller, iteration)               # set the precisions for the coming iteration
    observe(iteration, loss) -> list[dict]     # after the iteration: its training loss (in a
                                               # distributed run, the mean over processes);
                                               # returns the events it produced (turning points)
    precision_at(iteration) -> (a, w, g) | None   # what it runs at, for logs (None: ask the sites)
    regularizer(model, mean=None) -> tensor | None  # a cost term added to the loss (DFQ)
    describe() -> str                          # one line for logs
    state_dict() -> dict | None / load_state_dict(state)   # checkpointed when not None

An object of your own with just ``apply`` and ``observe`` works too: :func:`as_schedule` gives it
the defaults (``fit`` and ``FracModel.use_schedule`` accept it).

* :class:`Static` — fixed precision (SBM-style 8/8 training is ``Static(8, 8, 8)``).
* :class:`PFQ` — FracTrain's progressive fractional quantization (Algorithm 1, as its public code
  runs it).
* :class:`Cyclic` — CPT (Fu et al., ICLR 2021): cosine-cyclic forward precision, fixed gradients.
* :class:`DFQ` / :class:`FracTrain` — dynamic precision under a cost target (below).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import check_bits
from ..cost import CP_SCOPES
from ..errors import ConfigError
from .controller import PrecisionController


class Schedule:
    """Base class of the schedules, with a default for every method but ``apply``'s own effect:
    the base class itself leaves the controller as it is (the precisions set by hand)."""

    kind = "custom"  # the ``schedule_kind`` of the run log

    def apply(self, controller: PrecisionController, iteration: int) -> None:
        """Set the precisions for ``iteration`` (the default changes nothing)."""

    def observe(self, iteration: int, loss: float) -> list[dict]:
        """Take ``iteration``'s training loss; return the events it caused (none by default)."""
        return []

    def precision_at(self, iteration: int) -> tuple[int, int, int] | None:
        """The (a, w, g) every site runs at in ``iteration``; None when the schedule does not set
        one precision for all (the log then reports the sites' most common one)."""
        return None

    def regularizer(self, model, mean: Callable[[float], float] | None = None):
        """A term added to the training loss (a tensor), or None. ``mean`` turns a value of this
        process into the mean over all processes of a distributed run, so that a decision made
        from it (DFQ's sign) is the same everywhere."""
        return None

    def describe(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict[str, Any] | None:
        """Plain data to checkpoint, or None (nothing to restore)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _Adapted(Schedule):
    """A user object with ``apply`` and ``observe`` (and optionally ``describe``, ``state_dict``
    and ``load_state_dict``), with the defaults of :class:`Schedule` for the rest."""

    kind = "custom"

    def __init__(self, inner):
        self.inner = inner

    def apply(self, controller, iteration):
        self.inner.apply(controller, iteration)

    def observe(self, iteration, loss):
        return self.inner.observe(iteration, loss)

    def describe(self) -> str:
        describe = getattr(self.inner, "describe", None)
        return describe() if callable(describe) else type(self.inner).__name__

    def state_dict(self):
        save = getattr(self.inner, "state_dict", None)
        return save() if callable(save) else None

    def load_state_dict(self, state):
        load = getattr(self.inner, "load_state_dict", None)
        if callable(load):
            load(state)


def as_schedule(schedule) -> Schedule:
    """``schedule`` as a :class:`Schedule`: itself when it is one, ``Schedule()`` (keep the
    precisions) for None, else an adapter of an object with ``apply`` and ``observe``
    (``TypeError`` without them)."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule is None:
        return Schedule()
    if not (callable(getattr(schedule, "apply", None)) and callable(getattr(schedule, "observe", None))):
        raise TypeError(
            f"{type(schedule).__name__} is not a schedule: it needs "
            "apply(controller, iteration) and observe(iteration, loss)"
        )
    return _Adapted(schedule)


def _bits_list(name: str, values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not values:
        raise ConfigError(f"{name} must list at least one precision")
    return tuple(check_bits(f"{name} entry", v) for v in values)


class Static(Schedule):
    """Fixed precision for every site (``w`` defaults to ``a``)."""

    kind = "static"

    def __init__(self, a: int = 8, w: int | None = None, g: int = 8):
        self.a = check_bits("a", a)
        self.w = check_bits("w", a if w is None else w)
        self.g = check_bits("g", g)

    def apply(self, controller: PrecisionController, iteration: int) -> None:
        controller.set(a=self.a, w=self.w, g=self.g)

    def observe(self, iteration: int, loss: float) -> list[dict]:
        return []

    def current(self) -> tuple[int, int, int]:
        return self.a, self.w, self.g

    def precision_at(self, iteration: int) -> tuple[int, int, int]:
        return self.current()

    def describe(self) -> str:
        return f"static a/w/g = {self.a}/{self.w}/{self.g}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "static", "a": self.a, "w": self.w, "g": self.g}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(state["a"], state["w"], state["g"])


class PFQ(Schedule):
    """Progressive fractional quantization (FracTrain Alg. 1).

    Training runs in evaluation periods of ``eval_every`` iterations. The mean training loss of each
    period enters a window of the last ``window`` (5) period losses. The loss normalizer is the mean
    period loss over the first ``normalizer_periods`` (10) periods (the running mean until then). A
    turning point fires when every normalized difference ``|L_newest - L_i| / normalizer`` between
    the newest loss and the ``window - 1`` earlier ones is at most the threshold ``eps``; then the
    window is cleared, ``eps`` is multiplied by ``alpha`` after the first and second turning points,
    and precision moves to the next entry of ``fw`` (activations and weights) and ``bw``
    (gradients). At most ``turning_points`` (default ``len(fw) - 1``) fire.
    """

    kind = "pfq"

    def __init__(
        self,
        fw: Sequence[int] = (3, 4, 6, 8),
        bw: Sequence[int] = (6, 6, 8, 8),
        *,
        eval_every: int = 100,
        eps: float = 0.05,
        alpha: float = 0.3,
        turning_points: int | None = None,
        window: int = 5,
        normalizer_periods: int = 10,
    ):
        self.fw = _bits_list("PFQ fw", fw)
        self.bw = _bits_list("PFQ bw", bw)
        if len(self.fw) != len(self.bw):
            raise ConfigError(
                f"PFQ fw {list(self.fw)} and bw {list(self.bw)} must have the same number of entries"
            )
        if turning_points is None:
            turning_points = len(self.fw) - 1
        if not 0 <= turning_points <= len(self.fw) - 1:
            raise ConfigError(
                f"PFQ turning_points = {turning_points} is out of range: allowed "
                f"0..{len(self.fw) - 1} (one fewer than the schedule's entries)"
            )
        if eval_every < 1:
            raise ConfigError(f"PFQ eval_every = {eval_every} must be at least 1")
        if not eps > 0 or not 0 < alpha <= 1:
            raise ConfigError(f"PFQ eps = {eps} must be > 0 and alpha = {alpha} in (0, 1]")
        if window < 2 or normalizer_periods < 1:
            raise ConfigError("PFQ window must be at least 2 and normalizer_periods at least 1")
        self.eval_every = int(eval_every)
        self.eps0 = float(eps)
        self.alpha = float(alpha)
        self.max_turning_points = int(turning_points)
        self.window_size = int(window)
        self.normalizer_periods = int(normalizer_periods)
        self.reset()

    def reset(self) -> None:
        self.eps = self.eps0
        self.stage = 0
        self.window: list[float] = []
        self.period_sum = 0.0
        self.period_count = 0
        self.periods = 0
        self.normalizer_sum = 0.0
        self.normalizer = 1.0
        self.turning_points: list[int] = []  # iterations at which they fired

    # -- protocol ---------------------------------------------------------------------------------
    def current(self) -> tuple[int, int, int]:
        return self.fw[self.stage], self.fw[self.stage], self.bw[self.stage]

    def precision_at(self, iteration: int) -> tuple[int, int, int]:
        return self.current()

    def apply(self, controller: PrecisionController, iteration: int) -> None:
        a, w, g = self.current()
        controller.set(a=a, w=w, g=g)

    def observe(self, iteration: int, loss: float) -> list[dict]:
        self.period_sum += float(loss)
        self.period_count += 1
        if self.period_count < self.eval_every:
            return []
        return self.end_period(iteration, self.period_sum / self.period_count)

    def end_period(self, iteration: int, period_loss: float) -> list[dict]:
        """Feed one period's mean loss (``observe`` calls this every ``eval_every`` iterations)."""
        self.period_sum, self.period_count = 0.0, 0
        self.periods += 1
        if self.periods <= self.normalizer_periods:
            self.normalizer_sum += period_loss
            self.normalizer = self.normalizer_sum / self.periods
        if len(self.turning_points) >= self.max_turning_points:
            return []
        self.window.append(period_loss)
        if len(self.window) > self.window_size:
            self.window.pop(0)
        if len(self.window) < self.window_size:
            return []
        newest = self.window[-1]
        diffs = [abs(newest - earlier) / self.normalizer for earlier in self.window[:-1]]
        if any(d > self.eps for d in diffs):
            return []
        self.turning_points.append(iteration)
        count = len(self.turning_points)
        event = {
            "event": "turning_point",
            "index": count,
            "iter": iteration,
            "eps": self.eps,
            "diffs": diffs,
            "normalizer": self.normalizer,
        }
        if count in (1, 2):
            self.eps *= self.alpha
        self.window = []
        self.stage = min(self.stage + 1, len(self.fw) - 1)
        a, w, g = self.current()
        event["precision"] = {"a": a, "w": w, "g": g}
        return [event]

    def describe(self) -> str:
        return (
            f"PFQ fw {','.join(map(str, self.fw))} / bw {','.join(map(str, self.bw))}, "
            f"eval_every {self.eval_every}, eps {self.eps0}, alpha {self.alpha}"
        )

    # -- state ------------------------------------------------------------------------------------
    _STATE = (
        "eps",
        "stage",
        "window",
        "period_sum",
        "period_count",
        "periods",
        "normalizer_sum",
        "normalizer",
        "turning_points",
    )

    def state_dict(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self._STATE}
        state["window"] = list(self.window)
        state["turning_points"] = list(self.turning_points)
        state["config"] = {
            "fw": list(self.fw),
            "bw": list(self.bw),
            "eval_every": self.eval_every,
            "eps": self.eps0,
            "alpha": self.alpha,
            "turning_points": self.max_turning_points,
            "window": self.window_size,
            "normalizer_periods": self.normalizer_periods,
        }
        state["kind"] = "pfq"
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(**state["config"])
        for k in self._STATE:
            value = state[k]
            setattr(self, k, list(value) if isinstance(value, list) else value)


class Cyclic(Schedule):
    """CPT (cyclic precision training): within each of ``cycles`` equal cycles over ``total_iters``
    iterations, the forward precision (activations and weights) rises from ``low`` to ``high`` along
    a cosine, ``ceil(low + (high - low) * (1 - cos(pi * t / T)) / 2)``; gradients stay at ``g``.
    From ``total_iters`` on (the model after training, where CPT is evaluated) the precision is
    ``high``."""

    kind = "cyclic"

    def __init__(self, low: int = 3, high: int = 8, *, cycles: int = 8, total_iters: int, g: int = 8):
        self.low = check_bits("Cyclic low", low)
        self.high = check_bits("Cyclic high", high)
        self.g = check_bits("Cyclic g", g)
        if not self.low or not self.high or self.low > self.high:
            raise ConfigError(f"Cyclic bounds low = {low}, high = {high}: need 0 < low <= high")
        if cycles < 1 or total_iters < cycles:
            raise ConfigError(
                f"Cyclic needs cycles >= 1 and total_iters >= cycles (got {cycles}, {total_iters})"
            )
        self.cycles = int(cycles)
        self.total_iters = int(total_iters)
        self.period = self.total_iters / self.cycles

    def bits_at(self, iteration: int) -> int:
        if iteration >= self.total_iters:  # training is over: the last cycle ended at the upper
            return self.high  # precision, which CPT is evaluated at
        t = math.fmod(iteration, self.period)
        value = self.low + 0.5 * (self.high - self.low) * (1 - math.cos(math.pi * t / self.period))
        return min(self.high, math.ceil(value - 1e-9))

    def current_at(self, iteration: int) -> tuple[int, int, int]:
        b = self.bits_at(iteration)
        return b, b, self.g

    def precision_at(self, iteration: int) -> tuple[int, int, int]:
        return self.current_at(iteration)

    def apply(self, controller: PrecisionController, iteration: int) -> None:
        a, w, g = self.current_at(iteration)
        controller.set(a=a, w=w, g=g)

    def observe(self, iteration: int, loss: float) -> list[dict]:
        return []

    def describe(self) -> str:
        return f"cyclic {self.low}..{self.high} bits over {self.cycles} cycles, g = {self.g}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "cyclic",
            "low": self.low,
            "high": self.high,
            "cycles": self.cycles,
            "total_iters": self.total_iters,
            "g": self.g,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["low"],
            state["high"],
            cycles=state["cycles"],
            total_iters=state["total_iters"],
            g=state["g"],
        )


def cost_regularizer(cp, target: float, beta: float, relax: float, value: float | None = None):
    """FracTrain's sign-switched cost term: ``beta * s * cp`` with ``s`` = 1 above
    ``target + relax``, 0.1 in ``[target, target + relax)``, -0.1 in ``[target - relax, target)``
    and -1 below, so the gates are pushed toward the target from either side. ``s`` is read from
    ``value`` when given (a distributed run: the mean cost ratio over the processes), else from
    ``cp``."""
    if value is not None:
        c = float(value)
    else:
        c = float(cp.detach()) if isinstance(cp, torch.Tensor) else float(cp)
    if c >= target + relax:
        sign = 1.0
    elif c >= target:
        sign = 0.1
    elif c >= target - relax:
        sign = -0.1
    else:
        sign = -1.0
    return beta * sign * cp


class DFQ(Schedule):
    """Dynamic fractional quantization under a budget: the gates (pipeline ``dfq``) choose each
    sample's (a, g); this schedule keeps weights at ``w`` bits and adds the cost regularizer that
    pulls the expected cost ratio toward ``target_cp`` (a fraction: 0.03 = 3% of fp32 training).
    ``cp_scope`` says of which fp32 training: ``"model"`` (default) the whole model's, the sites
    no gate feeds (e.g. the fp32 first and last layers) included at their precision; ``"gated"``
    the gated sites' alone, the unit of FracTrain's own code and paper, where the cheapest of its
    CIFAR candidates at 4-bit weights is about 1.8% and static 8/8/8 6.25%.
    In a distributed run the regularizer's sign comes from the mean cost ratio over the processes
    (the cost of the global batch), so every process pushes the gates the same way."""

    kind = "dfq"

    def __init__(
        self,
        target_cp: float = 0.03,
        *,
        beta: float = 2.0,
        relax: float = 0.002,
        w: int = 8,
        cp_scope: str = "model",
    ):
        if not 0 < target_cp <= 1:
            raise ConfigError(f"DFQ target cp = {target_cp} must be a fraction in (0, 1]")
        if cp_scope not in CP_SCOPES:
            raise ConfigError(f"DFQ cp_scope = {cp_scope!r} is not known: choose {' or '.join(CP_SCOPES)}")
        self.target_cp = float(target_cp)
        self.beta, self.relax = float(beta), float(relax)
        self.w = check_bits("DFQ w", w)
        self.cp_scope = cp_scope

    def apply(self, controller: PrecisionController, iteration: int) -> None:
        controller.set(w=self.w)

    def observe(self, iteration: int, loss: float) -> list[dict]:
        return []

    def regularizer(self, model, mean: Callable[[float], float] | None = None):
        cp = model.gate_cp(self.cp_scope)
        value = float(cp.detach())
        return cost_regularizer(
            cp, self.target_cp, self.beta, self.relax, value=mean(value) if mean is not None else value
        )

    def describe(self) -> str:
        return f"DFQ target cp {100 * self.target_cp:.2f}%{self._scope_text()}, beta {self.beta}, w {self.w}"

    def _scope_text(self) -> str:
        return " of the gated layers" if self.cp_scope == "gated" else ""

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "dfq",
            "target_cp": self.target_cp,
            "beta": self.beta,
            "relax": self.relax,
            "w": self.w,
            "cp_scope": self.cp_scope,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target_cp = state["target_cp"]
        self.beta, self.relax, self.w = state["beta"], state["relax"], state["w"]
        self.cp_scope = state.get("cp_scope", "model")  # checkpoints from before cp_scope


class FracTrain(DFQ):
    """FracTrain = PFQ + DFQ: DFQ's gates under a cost target that the PFQ indicator raises by
    ``cp_step`` at each of its turning points (e.g. 1.5%, then 2%, 2.5%, 3%)."""

    kind = "fractrain"

    def __init__(
        self,
        target_cp: float = 0.015,
        cp_step: float = 0.005,
        *,
        beta: float = 2.0,
        relax: float = 0.002,
        w: int = 8,
        eval_every: int = 100,
        eps: float = 0.05,
        alpha: float = 0.3,
        turning_points: int = 3,
        cp_scope: str = "model",
    ):
        super().__init__(target_cp, beta=beta, relax=relax, w=w, cp_scope=cp_scope)
        self.cp0, self.cp_step = self.target_cp, float(cp_step)
        stages = (w,) * (turning_points + 1)
        self.indicator = PFQ(
            stages, stages, eval_every=eval_every, eps=eps, alpha=alpha, turning_points=turning_points
        )

    def observe(self, iteration: int, loss: float) -> list[dict]:
        events = self.indicator.observe(iteration, loss)
        for event in events:
            self.target_cp = self.cp0 + self.cp_step * len(self.indicator.turning_points)
            event["target_cp"] = self.target_cp
            event.pop("precision", None)
        return events

    def describe(self) -> str:
        return (
            f"FracTrain target cp {100 * self.cp0:.2f}%{self._scope_text()} + {100 * self.cp_step:.2f}% "
            f"per PFQ turning point, w {self.w} (indicator: {self.indicator.describe()})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "kind": "fractrain",
            "cp0": self.cp0,
            "cp_step": self.cp_step,
            "indicator": self.indicator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cp0, self.cp_step = state["cp0"], state["cp_step"]
        self.indicator.load_state_dict(state["indicator"])
