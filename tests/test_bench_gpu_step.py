"""The CPU-side parts of bench/gpu_step.py: the modes, launch counting, the driver-call counter,
the order and budget of a run, the tables; and its exit without a GPU."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gs():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_step", BENCH / "gpu_step.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_step"] = mod  # (its dataclasses look their module up there)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_step", None)
        sys.path.remove(str(BENCH))


def test_modes_cover_fp32_bf16_and_tvm_with_and_without_graphs(gs):
    for model in gs.MODELS:
        modes = gs.modes_for(model)
        kinds = {(m.kind, m.autocast, m.graphs) for m in modes}
        assert {("plain", False, False), ("plain", True, False), ("tvm", False, False)} <= kinds
        assert {("plain", False, True), ("plain", True, True), ("tvm", False, True)} <= kinds
        assert modes[0].name == "fp32 eager"
    resnet = {m.name: m for m in gs.modes_for("resnet20")}
    assert resnet["fp32 channels-last"].channels_last and resnet["bf16 autocast channels-last"].channels_last


def test_count_launches_per_step(gs):
    cpu, cuda = "DeviceType.CPU", "DeviceType.CUDA"
    events = [
        SimpleNamespace(name="aten::mm", device_type=cpu),
        SimpleNamespace(name="cudaLaunchKernel", device_type=cpu),
        SimpleNamespace(name="cuLaunchKernel", device_type=cpu),
        SimpleNamespace(name="cudaGraphLaunch", device_type=cpu),
        SimpleNamespace(name="cudaMemcpyAsync", device_type=cpu),
        SimpleNamespace(name="ampere_sgemm_128x64", device_type=cuda),
        SimpleNamespace(name="gemm_mma_kernel0", device_type=cuda),
        SimpleNamespace(name="Memcpy HtoD (Pageable -> Device)", device_type=cuda),
        SimpleNamespace(name="Memset (Device)", device_type=cuda),
    ]
    assert gs.count_launches(events, steps=2) == (1.0, 1.5)
    assert gs.count_launches([], steps=1) == (0.0, 0.0)


def test_driver_launches_are_counted_and_the_driver_restored(gs, monkeypatch):
    from fraccompile.targets.runtime import cuda_driver

    seen = []
    monkeypatch.setattr(cuda_driver._Driver, "__call__", lambda self, name, *a: seen.append(name))
    original = cuda_driver._Driver.__call__
    drv = object.__new__(cuda_driver._Driver)
    with gs.DriverLaunches() as counter:
        drv("cuLaunchKernel", 1, 2)
        drv("cuMemsetD32Async", 0)
        drv("cuLaunchKernel")
    assert counter.count == 2 and seen == ["cuLaunchKernel", "cuMemsetD32Async", "cuLaunchKernel"]
    assert cuda_driver._Driver.__call__ is original


def test_run_order_budget_and_tables(gs, monkeypatch, capsys):
    measured = []

    def fake_measure(name, mode, args, inputs):
        measured.append((name, mode.name))
        ms = {"fp32 eager": 10.0, "bf16 autocast": 5.0}.get(mode.name, 20.0)
        return {"ms": ms, "counts": ["100", "90", "0"], "note": ""}

    def fake_child(name, mode, args, deadline):
        measured.append((name, "child: " + mode.name))
        return fake_measure(name, mode, args, None)

    monkeypatch.setattr(gs, "measure", fake_measure)
    monkeypatch.setattr(gs, "measure_in_child", fake_child)
    monkeypatch.setattr(gs, "_base", lambda name: None)
    args = SimpleNamespace(batch=4, block=8, repeats=3, budget=0.0)
    results = gs.run(["transformer"], args)
    names = [n for _, n in measured]
    # every mode once, in order, fraccompile's capture in a child process right after tvm's
    assert names[-3:] == [
        "fraccompile tvm 8/8/8",
        "child: fraccompile tvm 8/8/8 + cuda_graphs",
        "fraccompile tvm 8/8/8 + cuda_graphs",
    ]
    assert [n for n in names if not n.startswith("child")] == [m.name for m in gs.modes_for("transformer")]
    gs.print_results(results, args)
    out = capsys.readouterr().out
    assert "| fp32 eager " in out and "| 1.00x " in out  # fp32 against itself
    row = next(line for line in out.splitlines() if line.startswith("| fraccompile tvm 8/8/8 + cuda"))
    assert "| 20.00 " in row and "| 0.25x " in row and "| 0.50x " in row  # vs bf16, vs fp32

    measured.clear()
    args.budget = 1e-9  # everything past the deadline
    results = gs.run(["resnet20"], args)
    assert measured == [] and all(r["note"] == "skipped (time budget)" for _, r in results["resnet20"])


def test_dry_run_and_no_gpu_exit(gs, capsys):
    assert gs.main(["--dry-run", "--models", "resnet20"]) == 0
    assert "fp32 channels-last" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gs.main(["--models", "transformer"]) == 0
    assert capsys.readouterr().out.startswith("no GPU: skipped")
    with pytest.raises(SystemExit):
        gs.main(["--models", "vgg"])


def test_a_child_process_reports_its_mode_as_json(gs):
    """The --child protocol end to end; without a GPU the mode fails in the child (no CUDA), which
    the parent reports as that mode's note."""
    mode = gs.modes_for("resnet20")[-1]
    assert mode.graphs and mode.kind == "tvm"
    args = SimpleNamespace(batch=2, block=4, repeats=1)
    res = gs.measure_in_child("resnet20", mode, args, deadline=float("inf"))
    assert set(res) == {"ms", "counts", "note"}
    if not torch.cuda.is_available():
        assert res["ms"] is None and res["note"].startswith("failed: ")
    timed_out = gs.measure_in_child("resnet20", mode, args, deadline=0.0)
    assert timed_out["note"] == "stopped (time budget)"
