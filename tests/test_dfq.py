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
