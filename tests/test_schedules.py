"""Schedules: PFQ fires where a hand-computed loss sequence says it must; Static, Cyclic; state."""

import math

import pytest

from fraccompile import ConfigError
from fraccompile.control import (
    DFQ,
    PFQ,
    Cyclic,
    FracTrain,
    PrecisionController,
    Schedule,
    Static,
    as_schedule,
)

# Period losses and what Algorithm 1 must do with them (eps 0.05, alpha 0.3, window 5, normalizer =
# mean of the first 10 period losses, the running mean before that):
#  p7: window 6,5,4.9,4.85,4.84; normalizer 43.59/7 = 6.227; |4.84-6|/6.227 = 0.186 > 0.05 -> no
#  p8: window 5,4.9,4.85,4.84,4.83; normalizer 48.42/8 = 6.0525; max diff 0.17/6.0525 = 0.028 -> TP1
#      eps -> 0.015, window cleared
#  p13: window 4.0,3.9,3.85,3.84,3.83; normalizer (fixed after p10) 56.32/10 = 5.632;
#       0.17/5.632 = 0.030 > 0.015 -> no
#  p14: window 3.9,...,3.83; max diff 0.07/5.632 = 0.0124 <= 0.015 -> TP2, eps -> 0.0045
#  p19: five periods of 3.0, diffs 0 -> TP3 (eps stays 0.0045: it decays after TP1 and TP2 only)
#  later flat periods: no more turning points (3 = len(fw) - 1)
LOSSES = [
    10,
    8,
    6,
    5,
    4.9,
    4.85,
    4.84,
    4.83,
    4.0,
    3.9,
    3.85,
    3.84,
    3.83,
    3.83,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
    3.0,
]
EXPECTED_TP_PERIODS = [8, 14, 19]


def run_periods(pfq, losses, per_period=1):
    fired = []
    for p, loss in enumerate(losses, start=1):
        for k in range(per_period):
            # per-iteration losses whose period mean is `loss`
            offset = (k - (per_period - 1) / 2) * 0.01
            events = pfq.observe((p - 1) * per_period + k, loss + offset)
            fired += [(p, e) for e in events]
    return fired


def test_pfq_fires_exactly_at_the_hand_computed_periods():
    pfq = PFQ((3, 4, 6, 8), (6, 6, 8, 8), eval_every=1)
    fired = run_periods(pfq, LOSSES)
    assert [p for p, _ in fired] == EXPECTED_TP_PERIODS
    assert [e["precision"] for _, e in fired] == [
        {"a": 4, "w": 4, "g": 6},
        {"a": 6, "w": 6, "g": 8},
        {"a": 8, "w": 8, "g": 8},
    ]
    # the threshold used by each turning point, and its decay
    assert [e["eps"] for _, e in fired] == pytest.approx([0.05, 0.015, 0.0045])
    assert pfq.eps == pytest.approx(0.0045)
    assert fired[0][1]["normalizer"] == pytest.approx(48.42 / 8)
    assert fired[1][1]["normalizer"] == pytest.approx(56.32 / 10)
    assert max(fired[1][1]["diffs"]) == pytest.approx(0.07 / 5.632)


def test_pfq_periods_average_the_iteration_losses():
    pfq = PFQ(eval_every=4)
    fired = run_periods(pfq, LOSSES, per_period=4)
    assert [p for p, _ in fired] == EXPECTED_TP_PERIODS
    assert fired[0][1]["iter"] == 8 * 4 - 1  # the iteration that closed period 8


def test_pfq_threshold_matters():
    # with a 10x smaller threshold the first turning point cannot fire at period 8
    pfq = PFQ(eval_every=1, eps=0.005)
    assert 8 not in [p for p, _ in run_periods(pfq, LOSSES)]


def test_pfq_drives_the_controller():
    ctrl = PrecisionController(["a", "b"])
    pfq = PFQ((3, 4, 6, 8), (6, 6, 8, 8), eval_every=1)
    pfq.apply(ctrl, 0)
    assert tuple(ctrl["a"]) == (3, 3, 6)
    run_periods(pfq, LOSSES[:8])
    pfq.apply(ctrl, 8)
    assert tuple(ctrl["b"]) == (4, 4, 6)


def test_pfq_state_round_trip_continues_identically():
    a = PFQ(eval_every=2)
    run_periods(a, LOSSES[:11], per_period=2)
    b = PFQ()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    rest_a = run_periods(a, LOSSES[11:], per_period=2)
    rest_b = run_periods(b, LOSSES[11:], per_period=2)
    assert [(p, e["iter"]) for p, e in rest_a] == [(p, e["iter"]) for p, e in rest_b]
    assert rest_a  # the continuation did fire


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"fw": (3, 4), "bw": (6,)}, "same number"),
        ({"turning_points": 5}, "turning_points"),
        ({"eval_every": 0}, "eval_every"),
        ({"eps": 0}, "eps"),
        ({"fw": (3, 99, 8, 8)}, "fw entry"),
    ],
)
def test_pfq_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PFQ(**kwargs)


def test_static():
    ctrl = PrecisionController(["x"])
    s = Static(6, g=12)
    s.apply(ctrl, 123)
    assert tuple(ctrl["x"]) == (6, 6, 12)
    assert s.observe(0, 1.0) == []
    t = Static()
    t.load_state_dict(s.state_dict())
    assert t.current() == (6, 6, 12)
    with pytest.raises(ConfigError):
        Static(1)


def test_cyclic_follows_the_cpt_cosine():
    c = Cyclic(3, 8, cycles=2, total_iters=100, g=8)
    assert c.bits_at(0) == 3 and c.bits_at(50) == 3  # each cycle restarts at the low bound
    assert c.bits_at(25) == math.ceil(3 + 2.5 * (1 - math.cos(math.pi / 2)))  # 6
    assert c.bits_at(49) == 8
    assert c.bits_at(99) == 8 and c.bits_at(100) == 8  # after training: the upper precision
    seq = [c.bits_at(t) for t in range(50)]
    assert seq == sorted(seq)  # rises monotonically within a cycle
    ctrl = PrecisionController(["x"])
    c.apply(ctrl, 25)
    assert tuple(ctrl["x"]) == (6, 6, 8)
    d = Cyclic(4, 4, total_iters=10)
    d.load_state_dict(c.state_dict())
    assert [d.bits_at(t) for t in range(100)] == [c.bits_at(t) for t in range(100)]
    with pytest.raises(ConfigError):
        Cyclic(8, 3, total_iters=100)


def test_user_schedules_follow_the_protocol():
    class EveryOther:
        def apply(self, controller, iteration):
            controller.set(a=4 if iteration % 2 else 8)

        def observe(self, iteration, loss):
            return []

    adapted = as_schedule(EveryOther())
    assert isinstance(adapted, Schedule) and as_schedule(adapted) is adapted
    ctrl = PrecisionController(["a", "b"])
    adapted.apply(ctrl, 1)
    assert ctrl["a"].a == 4 and adapted.observe(1, 0.5) == []
    # the base class's defaults stand in for what the object lacks
    assert adapted.precision_at(3) is None and adapted.regularizer(None) is None
    assert adapted.state_dict() is None and adapted.describe() == "EveryOther"
    assert isinstance(PFQ(), Schedule) and isinstance(Static(), Schedule)
    assert isinstance(as_schedule(None), Schedule) and as_schedule(None).kind == "custom"
    with pytest.raises(TypeError, match="not a schedule"):
        as_schedule(object())


def test_schedule_base_class_defaults_and_what_each_schedule_overrides():
    class OnlyApply(Schedule):
        def apply(self, controller, iteration):
            controller.set(a=6)

    s = OnlyApply()
    assert s.observe(0, 1.0) == [] and s.precision_at(0) is None and s.state_dict() is None
    assert s.regularizer(None) is None and s.describe() == "OnlyApply"
    assert Static(4, 4, 8).precision_at(10) == (4, 4, 8)
    assert PFQ((3, 8), (6, 8)).precision_at(0) == (3, 3, 6)
    c = Cyclic(3, 8, cycles=2, total_iters=100)
    assert [c.precision_at(t) for t in (0, 25)] == [c.current_at(0), c.current_at(25)]
    assert [k.kind for k in (Static(), PFQ(), c, DFQ(), FracTrain())] == [
        "static",
        "pfq",
        "cyclic",
        "dfq",
        "fractrain",
    ]


def test_dfq_regularizer_sign_comes_from_the_agreed_cost():
    """In a distributed run the sign of the cost term is read from the mean cost over the
    processes (``mean``), the gradient still flows through this process's own cost."""
    import torch

    cp = torch.tensor(0.05, requires_grad=True)

    class Model:
        def gate_cp(self, scope="model"):
            return cp

    dfq = DFQ(0.03, beta=2.0, relax=0.002)
    assert float(dfq.regularizer(Model())) == pytest.approx(2.0 * 0.05)  # above: s = +1
    reg = dfq.regularizer(Model(), mean=lambda v: 0.01)  # the mean is below target: s = -1
    assert float(reg) == pytest.approx(-2.0 * 0.05)
    reg.backward()
    assert float(cp.grad) == pytest.approx(-2.0)
