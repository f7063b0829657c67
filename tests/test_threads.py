"""The CPU kernels' parallel loops on torch's OpenMP threads (fraccompile/targets/runtime/threads.py)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


@pytest.fixture
def threads(monkeypatch):
    from fraccompile.targets.runtime import threads

    monkeypatch.delenv(threads.ENV, raising=False)
    threads._launcher.cache_clear()
    yield threads
    threads._launcher.cache_clear()


def _launch(threads):
    address, why = threads._launcher()
    assert address is not None, why
    lam = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    launch = ctypes.CFUNCTYPE(ctypes.c_int, lam, ctypes.c_void_p, ctypes.c_int)(address)
    return lam, launch


def test_launcher_runs_every_task_once_and_passes_errors_back(threads):
    """TVM's contract: each task id in [0, num_task) once, penv->num_task the count; a non-zero
    return of any task is the launch's return. Called here with ctypes lambdas (the GIL
    serialises them; the kernels' own lambdas run concurrently)."""
    lam, launch = _launch(threads)
    for num_task in (1, 2, 7):
        seen = []

        def task(task_id, penv, cdata, seen=seen):
            seen.append((task_id, ctypes.cast(penv, ctypes.POINTER(ctypes.c_int32))[2]))
            return 0

        assert launch(lam(task), None, num_task) == 0
        assert sorted(seen) == [(t, num_task) for t in range(num_task)]

    def failing(task_id, penv, cdata):
        return -1 if task_id == 1 else 0

    assert launch(lam(failing), None, 3) == -1


_SMALL_TEAM = textwrap.dedent("""
    import ctypes, json, torch
    from fraccompile.targets.runtime import threads
    lam = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    launch = ctypes.CFUNCTYPE(ctypes.c_int, lam, ctypes.c_void_p, ctypes.c_int)(
        threads._launcher()[0])
    seen = []
    keep = lam(lambda task_id, penv, cdata: seen.append(task_id) or 0)
    print(json.dumps({"rc": launch(keep, None, 7), "seen": sorted(seen)}))
""")


def test_launcher_runs_every_task_when_the_team_is_smaller():
    """OMP_THREAD_LIMIT=2 caps the team under the 7 tasks asked for (as a nested region would):
    each thread runs every team-th task."""
    env = dict(os.environ, OMP_THREAD_LIMIT="2")
    proc = subprocess.run(
        [sys.executable, "-c", _SMALL_TEAM], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "seen": list(range(7))}


def test_launcher_team_follows_torch_set_num_threads(threads):
    """num_task 0 (what TVM's code passes): one task per thread of torch's team."""
    lam, launch = _launch(threads)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            counts = []

            def task(task_id, penv, cdata, counts=counts):
                counts.append(ctypes.cast(penv, ctypes.POINTER(ctypes.c_int32))[2])
                return 0

            assert launch(lam(task), None, 0) == 0
            assert counts == [n] * n
    finally:
        torch.set_num_threads(before)


def test_cached_kernel_is_adopted_and_exact(threads, tmp_path):
    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.runtime.cache import KernelCache

    cache = KernelCache(tmp_path)
    shape = gemm.padded(3, 40, 48, 64)  # several parallel tasks: (group, n-block, m-block)
    fn = cache.get(shape)
    assert cache.stats.adopted == 1
    lib = ctypes.CDLL(str(cache.path(shape)))
    slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
    assert slot.value == threads._launcher()[0]
    g = torch.Generator().manual_seed(0)
    A = torch.randint(0, 256, (3, shape.m, shape.k), dtype=torch.uint8, generator=g)
    B = torch.randint(-128, 128, (3, shape.n // 16, shape.k // 4, 16, 4), dtype=torch.int8, generator=g)
    C = torch.empty(3, shape.m, shape.n, dtype=torch.int32)
    b = B.permute(0, 1, 3, 2, 4).reshape(3, shape.n, shape.k)
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            C.zero_()
            fn(A, B, C)
            assert torch.equal(C.long(), A.long() @ b.long().mT), n
    finally:
        torch.set_num_threads(before)


def test_mode_tvm_keeps_tvm_pool_and_bad_mode_is_refused(threads, monkeypatch, tmp_path):
    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.runtime.cache import KernelCache

    monkeypatch.setenv(threads.ENV, "tvm")
    assert not threads.on_openmp() and "FRACCOMPILE_THREADS=tvm" in threads.pool()
    cache = KernelCache(tmp_path)
    cache.get(gemm.padded(1, 8, 16, 8))
    assert cache.stats.adopted == 0 and cache.stats.loaded == 1
    threads._launcher.cache_clear()
    monkeypatch.setenv(threads.ENV, "openmp-please")
    with pytest.raises(ValueError, match="FRACCOMPILE_THREADS='openmp-please'"):
        threads.pool()


def test_openmp_library_is_torchs():
    from fraccompile.targets.runtime import threads

    path = threads.openmp_library()
    assert path is not None and os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp"))
    assert "OpenMP" in torch.__config__.parallel_info()


_STEP = textwrap.dedent("""
    import json, sys, torch
    import fraccompile
    from fraccompile import FracConfig
    from fraccompile.examples.resnet_cifar import resnet20
    from fraccompile.targets.runtime import threads
    torch.manual_seed(0)
    model = resnet20(num_classes=10)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    fm = fraccompile.compile(model, x, FracConfig(scheme="symmetric", backend="tvm"))
    fm.train()
    torch.manual_seed(1)
    loss = torch.nn.functional.cross_entropy(fm(x), y)
    loss.backward()
    grads = [p.grad.double().sum().item() for p in fm.parameters() if p.grad is not None]
    print(json.dumps({"pool": threads.pool(), "loss": loss.item(), "grads": grads}))
""")


def test_training_step_is_the_same_on_either_pool(tmp_path):
    """The pool runs the same tasks: a ResNet-20 step gives bit-identical loss and gradients."""
    out = {}
    for mode in ("openmp", "tvm"):
        env = dict(os.environ, FRACCOMPILE_THREADS=mode)
        proc = subprocess.run(
            [sys.executable, "-c", _STEP], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["openmp"]["pool"].startswith("torch's OpenMP threads")
    assert out["tvm"]["pool"].startswith("TVM's thread pool")
    assert out["openmp"]["loss"] == out["tvm"]["loss"]
    assert out["openmp"]["grads"] == out["tvm"]["grads"]
