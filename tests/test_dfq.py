"""DFQ: gating subgraphs, dense vs routed execution, expected cost, regularizer, FracTrain."""

import copy

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fraccompile
from fraccompile.cli import app
from fraccompile.control import DFQ, FracTrain, cost_regularizer
from fraccompile.examples import functional_model, resnet_cifar, transformer_lm


def _pair(factory, x, **kw):
    """The model compiled with DFQ gates and without, on the reference backend unless ``kw`` says
    otherwise: these tests state DFQ's semantics (the contract); the dense mode always runs there,
    and tests/test_routed_kernels.py holds the tvm backend's routed sites to it."""
    kw.setdefault("backend", "reference")
    torch.manual_seed(0)
    model = factory()
    return (
        fraccompile.compile(copy.deepcopy(model), x, pipeline="dfq", **kw),
        fraccompile.compile(
            copy.deepcopy(model), x, **{k: v for k, v in kw.items() if not k.startswith("gate_")}
        ),
    )


@pytest.mark.parametrize(
    "factory, x",
    [
        (resnet_cifar.resnet20, torch.randn(2, 3, 32, 32)),
        (transformer_lm.model, torch.randint(0, 65, (4, 16))),
    ],
)
def test_dense_forced_to_one_candidate_equals_static(factory, x):
    gated, static = _pair(factory, x, gate_mode="dense")
    bank = gated.frac_gates
    for k, (a, g) in enumerate(zip(bank.a, bank.g)):
        if factory is resnet_cifar.resnet20 and k not in (0, len(bank.a) - 1):
            continue  # the transformer case covers every candidate; keep the ResNet one short
        bank.forced = k
        static.precision.set(a=a, w=8, g=g)
        assert torch.equal(gated(x), static(x)), k


def _varied(model):
    """Make the gates' choices differ between samples (an untrained head picks one candidate)."""
    with torch.no_grad():
        model.frac_gates.head.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    return model


def test_routed_matches_dense_forward_and_trains_gates_alike():
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    dense, _ = _pair(resnet_cifar.resnet20, x, gate_mode="dense")
    _varied(dense)
    routed = copy.deepcopy(dense)
    routed.frac_gates.mode = "routed"
    out_d, out_r = dense(x), routed(x)
    choices = torch.stack([g.choice for g in dense.frac_gates.last.values()])
    assert len(torch.unique(choices)) > 1, "decisions should vary"
    for region, gate in dense.frac_gates.last.items():
        assert torch.equal(gate.choice, routed.frac_gates.last[region].choice)
    torch.testing.assert_close(out_r, out_d, rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    F.cross_entropy(out_d, y).backward()
    torch.manual_seed(3)
    F.cross_entropy(out_r, y).backward()

    def grads(m, gates):
        return torch.cat(
            [
                p.grad.flatten()
                for n, p in m.named_parameters()
                if ("frac_gates" in n) == gates and p.grad is not None
            ]
        )

    # the two modes draw different stochastic-rounding noise for dy (6..12 bits): over seeds 3..6
    # the gates' cosine was 0.89-0.98 with torch.rand noise and 0.88-0.94 with counter noise
    assert F.cosine_similarity(grads(dense, True), grads(routed, True), 0) > 0.85
    assert F.cosine_similarity(grads(dense, False), grads(routed, False), 0) > 0.95


def test_gates_are_visible_and_state_resets_each_forward():
    fm, _ = _pair(resnet_cifar.resnet20, torch.randn(2, 3, 32, 32))
    assert "gate_region0 = self.frac_gates('region0', relu, None)" in fm.code
    assert "self.frac_gates('region1', relu_2, gate_region0)" in fm.code
    assert "self.frac_precision('layer1.0.conv1', gate_region0)" in fm.code
    assert fm.code.count("self.frac_gates(") == 9
    x = torch.randn(2, 3, 32, 32)
    first = fm(x)
    assert torch.equal(fm(x), first)  # no state carried over from the previous forward


def test_expected_cost_and_its_gradient():
    fm, static = _pair(resnet_cifar.resnet20, torch.randn(8, 3, 32, 32))
    fm(torch.randn(8, 3, 32, 32))
    cp = fm.gate_cp()
    assert cp.item() == pytest.approx(fm.cost().cp, rel=1e-6)
    cp.backward()
    assert fm.frac_gates.head.weight.grad.abs().sum() > 0
    # forced to the cheapest candidate the cost equals static at that precision
    fm.frac_gates.forced = 0
    fm(torch.randn(8, 3, 32, 32))
    static.precision.set(a=3, w=8, g=6)
    assert fm.cost().cp == pytest.approx(static.cost().cp)


def test_gated_cp_scope_counts_the_gated_sites_alone():
    """``cp_scope="gated"`` is FracTrain's code's cp: over the gated sites only, so the cheapest
    candidate (3/6) at 4-bit weights is (3·4 + 6·4 + 3·6) / (3·32·32) whatever the ungated layers
    cost; the model scope adds those at their precision, as cost() counts them."""
    fm, _ = _pair(resnet_cifar.resnet20, torch.randn(8, 3, 32, 32))
    fm.precision.set(w=4)
    fm.frac_gates.forced = 0
    fm(torch.randn(8, 3, 32, 32))
    gated = fm.gate_cp("gated")
    assert gated.item() == pytest.approx((3 * 4 + 6 * 4 + 3 * 6) / 3072, rel=1e-6)
    rows = fm.cost().rows
    regions = fm._site_regions()
    ungated = [r for r in rows if r.name not in regions]
    assert [r.name for r in ungated] == ["conv1", "fc"]  # the fp32 first and last layers
    gated_macs = sum(r.macs for r in rows if r.name in regions)
    model = (gated.item() * 3 * gated_macs + sum(r.total for r in ungated)) / (3 * sum(r.macs for r in rows))
    assert fm.gate_cp("model").item() == pytest.approx(model, rel=1e-6)
    assert fm.gate_cp().item() == pytest.approx(fm.cost().cp, rel=1e-6)
    with pytest.raises(ValueError, match="scope"):
        fm.gate_cp("layers")
    # the schedule's regularizer reads its own scope: just above the gated target, s = +0.1
    dfq = DFQ(gated.item() - 0.001, w=4, cp_scope="gated", relax=0.002)
    assert dfq.regularizer(fm).item() == pytest.approx(0.1 * 2.0 * gated.item(), rel=1e-6)
    assert "of the gated layers" in dfq.describe()
    with pytest.raises(fraccompile.ConfigError, match="cp_scope"):
        DFQ(0.03, cp_scope="layers")


def test_cp_scope_survives_a_checkpoint():
    sched = FracTrain(0.015, 0.005, w=4, cp_scope="gated")
    other = FracTrain()
    other.load_state_dict(sched.state_dict())
    assert (other.cp_scope, other.w, other.cp0) == ("gated", 4, 0.015)
    old = {k: v for k, v in sched.state_dict().items() if k != "cp_scope"}  # saved before cp_scope
    other.load_state_dict(old)
    assert other.cp_scope == "model"


def test_cost_regularizer_signs():
    target, relax = 0.03, 0.002
    assert cost_regularizer(0.05, target, 2.0, relax) == pytest.approx(2.0 * 0.05)
    assert cost_regularizer(0.031, target, 2.0, relax) == pytest.approx(0.2 * 0.031)
    assert cost_regularizer(0.029, target, 2.0, relax) == pytest.approx(-0.2 * 0.029)
    assert cost_regularizer(0.01, target, 2.0, relax) == pytest.approx(-2.0 * 0.01)


def test_fractrain_raises_the_target_at_turning_points():
    sched = FracTrain(0.015, 0.005, eval_every=1, eps=0.05)
    losses = [10, 8, 6, 5, 4.9, 4.85, 4.84, 4.83, 4.0, 3.9, 3.85, 3.84, 3.83, 3.83]
    targets = []
    for i, loss in enumerate(losses):
        for e in sched.observe(i, loss):
            targets.append((i, e["target_cp"]))
    assert targets == [(7, pytest.approx(0.02)), (13, pytest.approx(0.025))]
    other = FracTrain()
    other.load_state_dict(sched.state_dict())
    assert other.target_cp == pytest.approx(0.025)
    with pytest.raises(fraccompile.ConfigError):
        DFQ(0)


def test_fit_with_dfq_logs_gate_shares(tmp_path):
    from fraccompile.data import ClassificationData
    from fraccompile.train import fit

    data = ClassificationData.from_source("bundled", batch_size=8, train_limit=32, test_limit=8)
    fm, _ = _pair(functional_model.model, torch.zeros(8, 3, 32, 32))
    result = fit(fm, data, iters=4, schedule=DFQ(0.03), eval_every=2, progress=False, out_dir=tmp_path)
    shares = result.periods[-1]["gates"]
    assert len(shares) == 3 and all(sum(s) == pytest.approx(1.0) for s in shares.values())
    assert result.periods[-1]["gate_candidates"] == [[3, 6], [4, 6], [4, 8], [6, 8], [6, 12]]
    # per class: which candidate each class's samples chose; over classes, the period's shares
    classes = result.periods[-1]["gate_classes"]
    assert classes.keys() == shares.keys()
    for region, table in classes.items():
        counts = torch.tensor(table, dtype=torch.float64)
        assert counts.shape == (10, 5) and counts.sum() == 2 * 8  # 2 steps of 8 samples
        assert torch.allclose(counts.sum(0) / 16, torch.tensor(shares[region], dtype=torch.float64))
    from fraccompile.plots import render_report

    paths = render_report(tmp_path)
    assert "gates_by_class.png" in [p.name for p in paths]
    assert "## Gates per class" in (tmp_path / "summary.md").read_text()


def test_train_cli_sets_the_weight_bits_and_cp_scope(tmp_path):
    import json

    res = CliRunner().invoke(
        app,
        [
            "train",
            "examples/functional_model.py",
            "--schedule",
            "fractrain",
            "--weight-bits",
            "4",
            "--cp-scope",
            "gated",
            "--cp",
            "1.5",
            "--iters",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "8",
            "--train-limit",
            "16",
            "--test-limit",
            "8",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    start, *events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert start["schedule"].startswith("FracTrain target cp 1.50% of the gated layers")
    assert [e["precision"]["w"] for e in events if e["event"] == "period"] == [4.0]
    bad_args = ["train", "examples/functional_model.py", "--schedule", "dfq", "--cp-scope", "x"]
    bad = CliRunner().invoke(app, bad_args)
    assert bad.exit_code != 0 and "cp_scope" in bad.output


def test_transform_shows_gates(tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "transform",
            "examples/transformer_lm.py",
            "--input-shape",
            "2,16",
            "--pipeline",
            "dfq",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "self.frac_gates('region0'" in (tmp_path / "transformed.py").read_text()
