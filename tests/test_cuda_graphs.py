"""FracConfig(cuda_graphs=True): validation, the refusals, and the bookkeeping of which graph may
replay (precision and shape changes, parameters replaced, captures undone on the buffers). Without
a GPU the capture is replaced by a fake graph (``_make_graphed``) that computes at the precisions
and shapes it was captured with, as a real graph would; the GPU tests at the end skip without one.
"""

import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn

import fraccompile
from fraccompile import FracConfig
from fraccompile import cuda_graphs as cg
from fraccompile.data import ClassificationData
from fraccompile.errors import ConfigError
from fraccompile.train import fit

CFG = FracConfig(a=8, w=8, g=0, backend="reference", full_precision=())  # g=0: no random draws


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _pair(**cfg):
    """The same model compiled with and without cuda_graphs."""
    torch.manual_seed(0)
    base = _net()
    x = torch.randn(4, 3, 8, 8)
    eager = fraccompile.compile(copy.deepcopy(base), x, CFG.replace(**cfg))
    graphed = fraccompile.compile(copy.deepcopy(base), x, CFG.replace(cuda_graphs=True, **cfg))
    return eager, graphed


class FakeGraphs:
    """Stands in for make_graphed_callables: warm-up forwards and backwards (which change the
    buffers, as the real ones do), then a "graph" that computes at the precisions and for the
    input shapes of its capture, whatever they are at replay."""

    def __init__(self, fail: Exception | None = None):
        self.captured: list[tuple[dict, list]] = []
        self.fail = fail

    def __call__(self, step, sample_args):
        model = step.model
        params = [p for p in step.parameters() if p.requires_grad]
        for _ in range(cg.WARMUP_ITERS):
            out = step(*sample_args)
            torch.autograd.grad(out.sum(), params, allow_unused=True)
        if self.fail is not None:
            raise self.fail
        prec, shapes = dict(model.precision.items()), [tuple(a.shape) for a in sample_args]
        self.captured.append((prec, shapes))

        def replay(*args):
            assert [tuple(a.shape) for a in args] == shapes, "a graph replayed with other shapes"
            now = dict(model.precision.items())
            for name, p in prec.items():
                model.precision.set_site(name, p)
            try:
                return step(*args)
            finally:
                for name, p in now.items():
                    model.precision.set_site(name, p)

        return replay


@pytest.fixture
def fake(monkeypatch):
    graphs = FakeGraphs()
    monkeypatch.setattr(cg, "_is_cuda", lambda t: True)
    monkeypatch.setattr(cg, "_make_graphed", graphs)
    return graphs


def _step(model, x, y, opt):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _train_both(eager, graphed, batches):
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed)]
    for x, y in batches:
        assert _step(eager, x, y, opts[0]) == _step(graphed, x, y, opts[1])
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- the option ----------------------------------------------------------------------------------
def test_config_field_validates_and_round_trips():
    assert FracConfig().cuda_graphs is False
    with pytest.raises(ConfigError, match="cuda_graphs = 1 must be true or false"):
        FracConfig(cuda_graphs=1)
    with pytest.raises(ConfigError, match="pipeline='dfq'.*data-dependent shape"):
        FracConfig(cuda_graphs=True, pipeline="dfq")
    cfg = FracConfig(cuda_graphs=True)
    assert FracConfig.from_toml(cfg.to_toml()) == cfg
    assert FracConfig.from_dict(cfg.to_dict()).cuda_graphs is True


def test_compile_refuses_a_gated_model():
    torch.manual_seed(0)
    fm = fraccompile.compile(_net(), torch.randn(4, 3, 8, 8), CFG.replace(pipeline="dfq"))
    assert fm.cuda_graphs is None
    with pytest.raises(ConfigError, match="DFQ gates"):
        fm.enable_cuda_graphs()


def test_cpu_training_step_is_refused_and_other_calls_run_eagerly():
    eager, graphed = _pair()
    x, _ = _batch()
    with pytest.raises(cg.CudaGraphError, match=r"CUDA tensors.*on cpu.*cuda_graphs=False"):
        graphed(x)
    for m in (eager, graphed):
        m.eval()
    assert torch.equal(eager(x), graphed(x))  # eval mode: never graphed
    for m in (eager, graphed):
        m.train()
    with torch.no_grad():  # no autograd: never graphed
        assert torch.equal(eager(x), graphed(x))
    assert graphed.cuda_graphs.captures == 0


def test_inputs_a_graph_cannot_take_are_refused(fake):
    _, graphed = _pair()
    x, _ = _batch()
    with pytest.raises(cg.CudaGraphError, match="keyword argument"):
        graphed(x=x)
    with pytest.raises(cg.CudaGraphError, match="cache_enabled=False"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graphed(x)
    assert fake.captured == []


# -- the bookkeeping -------------------------------------------------------------------------------
def test_capture_then_replay_equals_eager_training(fake):
    eager, graphed = _pair()
    _train_both(eager, graphed, [_batch(seed=s) for s in range(4)])
    stats = graphed.cuda_graphs
    assert (stats.captures, stats.replays) == (1, 3)
    # the warm-up steps of the capture left no trace: BatchNorm statistics and the sites' running
    # ranges equal those of four eager steps (checked in _train_both through the state_dict)
    assert any("running_mean" in k for k in graphed.state_dict())


def test_a_precision_change_invalidates_the_graph(fake):
    eager, graphed = _pair()
    batches = [_batch(seed=s) for s in range(3)]
    _train_both(eager, graphed, batches)
    for m in (eager, graphed):
        m.precision.set(a=4, w=6)
    _train_both(eager, graphed, batches)  # a stale graph would compute at 8/8
    stats = graphed.cuda_graphs
    assert (stats.captures, stats.replays) == (2, 4)
    assert stats.invalidations == ["the precision changed"]
    assert [next(iter(p.values())) for p, _ in fake.captured] == [(8, 8, 0), (4, 6, 0)]
    assert len(stats.graphs) == 1


def test_a_shape_change_captures_beside_and_the_oldest_is_dropped(fake):
    eager, graphed = _pair()
    sizes = [4, 4, 2, 4, 3, 4]  # 3 evicts the least recently used (2); 4 stays
    _train_both(eager, graphed, [_batch(n, seed=i) for i, n in enumerate(sizes)])
    stats = graphed.cuda_graphs
    assert [s[0][0] for _, s in fake.captured] == [4, 2, 3]
    assert (stats.captures, stats.replays) == (3, 3)
    assert len(stats.graphs) == cg.MAX_GRAPHS
    _train_both(eager, graphed, [_batch(2, seed=9)])  # dropped: captured again
    assert [s[0][0] for _, s in fake.captured] == [4, 2, 3, 2]
    assert stats.invalidations == []


def test_replaced_parameters_or_a_frozen_submodule_invalidate_the_graph(fake):
    _, graphed = _pair()
    x, _ = _batch()
    graphed(x).sum().backward()
    graphed.load_state_dict(copy.deepcopy(graphed.state_dict()), assign=True)
    graphed(x).sum().backward()
    stats = graphed.cuda_graphs
    assert stats.captures == 2
    assert stats.invalidations == ["the parameters, buffers or submodule modes changed"]
    graphed.precision.set(a=6)
    graphed(x).sum().backward()
    assert stats.invalidations[-1] == "the precision changed"
    norm = next(m for m in graphed.modules() if isinstance(m, nn.BatchNorm2d))
    norm.eval()  # frozen statistics inside a model in training mode: another graph
    graphed(x).sum().backward()
    assert stats.captures == 4 and "submodule modes" in stats.invalidations[-1]


def test_a_failed_capture_names_the_option_and_leaves_the_buffers(monkeypatch):
    err = RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    monkeypatch.setattr(cg, "_is_cuda", lambda t: True)
    monkeypatch.setattr(cg, "_make_graphed", FakeGraphs(fail=err))
    _, graphed = _pair()
    before = copy.deepcopy(graphed.state_dict())
    with pytest.raises(cg.CudaGraphError) as info:
        graphed(_batch()[0])
    text = str(info.value)
    assert "cuda_graphs = True" in text and "operation not permitted when stream is capturing" in text
    assert "host sync" in text and "FracConfig(cuda_graphs=False)" in text and "more" not in text
    assert info.value.__cause__ is err
    for (name, a), b in zip(before.items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name


def test_frequent_recaptures_warn_once(fake):
    _, graphed = _pair()
    x, _ = _batch()
    with pytest.warns(UserWarning, match="captures for .* replays") as record:
        for i in range(cg.CHURN_WARN_AFTER + 2):
            graphed.precision.set(a=4 + i % 2)
            graphed(x).sum().backward()
    assert len([w for w in record if "captures for" in str(w.message)]) == 1


def test_copies_start_without_graphs(fake):
    eager, graphed = _pair()
    graphed(_batch()[0]).sum().backward()
    twin = copy.deepcopy(graphed)
    assert twin.cuda_graphs is not None and twin.cuda_graphs is not graphed.cuda_graphs
    assert twin.cuda_graphs.captures == 0 and not twin.cuda_graphs.graphs
    assert copy.deepcopy(eager).cuda_graphs is None
    assert pickle.loads(pickle.dumps(graphed.cuda_graphs)).captures == 0


def test_fit_trains_through_the_graphs(fake):
    data = ClassificationData.from_source("bundled", batch_size=8, train_limit=32, test_limit=8, seed=0)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    x = torch.zeros(8, 3, 32, 32)
    results = []
    for flag in (False, True):
        fm = fraccompile.compile(copy.deepcopy(base), x, CFG.replace(cuda_graphs=flag))
        res = fit(fm, data, iters=6, eval_every=3, lr=0.05, progress=False)
        results.append(([p["train_loss"] for p in res.periods], fm.state_dict()))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1].values(), results[1][1].values()):
        assert torch.equal(a, b)
    assert fm.cuda_graphs.captures == 1 and fm.cuda_graphs.replays == 5


class _HostRead(AssertionError):
    pass


@contextlib.contextmanager
def _no_host_reads():
    """Python-level reads of a tensor's value on the host (what a CUDA graph cannot hold) raise."""

    def refuse(*args, **kwargs):
        raise _HostRead("host read inside the step")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "unique"):
            mp.setattr(torch.Tensor, name, refuse)
        for name in ("unique", "nonzero"):
            mp.setattr(torch, name, refuse)
        yield


@pytest.mark.parametrize("scheme,reads", [("sbm", False), ("symmetric", True)])
def test_reference_backend_step_host_reads(scheme, reads):
    """What docs/cuda.md says is left to capture on the reference backend: a training step
    (forward and backward, 8-bit gradients with counter noise) reads nothing on the host with
    ``sbm`` (the running ranges included); ``symmetric`` still decides signedness on the host."""
    model, _ = _pair(scheme=scheme, g=8)
    x, y = _batch()
    model(x)  # the first batch initializes the running ranges (no read either way)
    expect = pytest.raises(_HostRead) if reads else contextlib.nullcontext()
    with expect, _no_host_reads():
        nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters()) or reads


# -- on a GPU --------------------------------------------------------------------------------------
def _needs_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible to torch")


def test_gpu_graphed_steps_equal_eager_on_the_reference_backend():
    _needs_gpu()
    eager, graphed = (m.cuda() for m in _pair())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, graphed)]
    for s in range(4):
        x, y = (t.cuda() for t in _batch(seed=s))
        losses = [_step(m, x, y, o) for m, o in zip((eager, graphed), opts)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert (graphed.cuda_graphs.captures, graphed.cuda_graphs.replays) == (1, 3)


@pytest.mark.parametrize("scheme", ["sbm", "symmetric"])
def test_gpu_tvm_backend_captures_or_says_how_to_turn_it_off(scheme):
    _needs_gpu()
    from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason

    if gpu_unavailable_reason():
        pytest.skip(gpu_unavailable_reason())
    eager, graphed = (m.cuda() for m in _pair(backend="tvm", scheme=scheme, g=8))
    x, y = (t.cuda() for t in _batch())
    try:
        out = graphed(x)
    except cg.CudaGraphError as err:  # a host sync left in the GPU path
        assert "cuda_graphs=False" in str(err) and "host sync" in str(err)
        return
    torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-4)
    nn.functional.cross_entropy(out, y).backward()


def test_cli_train_with_cuda_graphs_on_the_cpu_is_one_error_line(tmp_path):
    from _cli_helpers import static_train_args
    from typer.testing import CliRunner

    from fraccompile.cli import app

    cfg = tmp_path / "cfg.toml"
    FracConfig(cuda_graphs=True, backend="reference", full_precision=()).save(cfg)
    model = tmp_path / "tiny.py"
    model.write_text(
        "import torch.nn as nn\n"
        "def model():\n"
        "    return nn.Sequential(\n"
        "        nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)\n"
        "    )\n"
    )
    args = static_train_args(model, "--config", str(cfg), iters=2, batch_size=8, train_limit=16, test_limit=8)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "fraccompile: error:" in result.output and "cuda_graphs=False" in result.output


def test_distributed_fit_is_refused(monkeypatch):
    from types import SimpleNamespace

    from fraccompile import distributed
    from fraccompile.errors import FracCompileError

    ctx = SimpleNamespace(active=True, rank=0, is_main=True, world_size=2, parallel="ddp")
    monkeypatch.setattr(distributed, "setup", lambda *a: ctx)
    monkeypatch.setattr(distributed, "shard_data", lambda data, ctx: data)
    monkeypatch.setattr(distributed, "teardown", lambda ctx: None)
    _, graphed = _pair()
    with pytest.raises(FracCompileError, match="cuda_graphs = True is not supported in distributed"):
        fit(graphed, object(), iters=1, progress=False)
