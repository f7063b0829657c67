"""Where the TVM backend hands a site to the reference backend, with its reason, and the CLI on the tvm
backend."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from _cli_helpers import static_train_args
from _tvm_helpers import _tiny

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops.backend import get_backend
from fraccompile.ops.modules import FracOp
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


def test_wide_precision_falls_back_and_comes_back():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    m = _tiny()
    fm = fraccompile.compile(copy.deepcopy(m), x, FracConfig(scheme="symmetric", backend="tvm"))
    fm.precision.set(a=8, w=16, g=8)
    sites = [s for s in fm.sites if not s.full_precision]
    assert all(s.backend == "reference" and "w=16 bits" in s.fallback_reason for s in sites)
    ref = fraccompile.compile(copy.deepcopy(m), x, FracConfig(scheme="symmetric"))
    ref.precision.set(a=8, w=16, g=8)
    assert torch.equal(fm(x), ref(x))  # the fallback is the reference computation
    fm.precision.set(a=8, w=8, g=8)
    assert [s.backend for s in fm.sites if not s.full_precision] == ["tvm", "tvm"]
    fm.precision.set(a=0, w=8, g=8)
    assert "a=full precision" in fm.sites[0].fallback_reason
    fm.precision.set(a=12, w=8, g=8)
    assert "a=12 bits" in fm.sites[0].fallback_reason
    fm.precision.set(a=8, w=8, g=16)  # wide gradients run as two 8-bit halves
    assert [s.backend for s in fm.sites if not s.full_precision] == ["tvm", "tvm"]


def test_gated_sites_run_on_tvm_and_report_it():
    from fraccompile.examples import resnet_cifar

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    fm = fraccompile.compile(
        resnet_cifar.resnet20(), x, FracConfig(scheme="symmetric", backend="tvm", pipeline="dfq")
    )
    fm(x)
    sites = [s for s in fm.sites if not s.full_precision]
    assert sites and all(s.backend == "tvm" for s in sites), {s.fallback_reason for s in sites}
    copy.deepcopy(fm)  # what a site remembers of its last (gated) call holds no autograd graph
    fm.frac_gates.mode = "dense"  # FracTrain's own execution: every candidate, on the reference
    fm(x)
    reasons = {s.fallback_reason for s in fm.sites if not s.full_precision}
    assert any(r and "dense gate mode" in r for r in reasons)


def test_depthwise_convs_fall_back_with_reason():
    from fraccompile.examples import mobilenetv2_cifar

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    fm = fraccompile.compile(mobilenetv2_cifar.model(), x, FracConfig(scheme="symmetric", backend="tvm"))
    sites = [s for s in fm.sites if not s.full_precision]
    dw = [s for s in sites if s.weight_shape[1] == 1]
    assert dw and all("depthwise" in s.fallback_reason for s in dw)
    assert all(s.backend == "tvm" for s in sites if s not in dw)


def test_missing_tvm_falls_back_everywhere(monkeypatch):
    from fraccompile.ops import backend as ob

    monkeypatch.setitem(
        ob._BACKENDS,
        "tvm",
        ob.UnavailableBackend("tvm", "TVM is not usable: ImportError: No module named 'tvm'"),
    )
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    m = _tiny()
    fm = fraccompile.compile(copy.deepcopy(m), x, FracConfig(scheme="symmetric", backend="tvm"))
    ref = fraccompile.compile(copy.deepcopy(m), x, FracConfig(scheme="symmetric"))
    assert all(
        s.backend == "reference" and "No module named 'tvm'" in s.fallback_reason
        for s in fm.sites
        if not s.full_precision
    )
    assert torch.equal(fm(x), ref(x))


def test_transform_cli_shows_backend_and_reason(tmp_path):
    from typer.testing import CliRunner

    from fraccompile.cli import app
    from fraccompile.examples import functional_model

    args = [
        "transform",
        f"{functional_model.__file__}:model",
        "--input-shape",
        "2,3,32,32",
        "--backend",
        "tvm",
        "--out",
        str(tmp_path),
    ]
    res = CliRunner().invoke(app, args, terminal_width=200)  # sbm, FracTrain's own scheme
    assert res.exit_code == 0, res.output
    assert "tvm" in res.output and "integer kernels take" not in res.output
    cfg = tmp_path / "wide.toml"
    FracConfig(a=12).save(cfg)  # 12-bit activations have no integer kernel: reported per site
    res = CliRunner().invoke(app, args + ["--config", str(cfg)], terminal_width=200)
    assert res.exit_code == 0 and "a=12 bits: integer kernels take" in res.output, res.output


def test_train_cli_on_the_tvm_backend(tmp_path):
    from typer.testing import CliRunner

    from fraccompile.cli import app
    from fraccompile.examples import resnet_cifar

    args = static_train_args(
        resnet_cifar.__file__,
        backend="tvm",
        scheme="symmetric",
        iters=2,
        eval_every=2,
        batch_size=8,
        test_limit=16,
        out=tmp_path,
    )
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["backend"] == "tvm" and run["config"]["scheme"] == "symmetric"
    assert (tmp_path / "log.jsonl").read_text().count('"iter"') >= 1


def test_model_with_tvm_backend_deepcopies_and_pickles():
    """Copies share the process's backend (its compiled kernels are not copied or pickled)."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    fm = fraccompile.compile(_tiny(), x, FracConfig(scheme="symmetric", backend="tvm"))
    y = fm(x)
    for clone in (copy.deepcopy(fm), pickle.loads(pickle.dumps(fm))):
        assert torch.equal(clone(x), y)
        backends = {m.backend for m in clone.modules() if isinstance(m, FracOp)}
        assert backends == {get_backend("tvm")}
