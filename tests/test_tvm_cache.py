"""The kernel cache across processes (reuse, concurrent builders, damaged files) and the GPU
path's glue with a stand-in GEMM."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _tvm_helpers import C2, TOL, rel

import fraccompile
from fraccompile import FracConfig
from fraccompile.ops.modules import FracOp
from fraccompile.targets import tvm_unavailable_reason

pytestmark = pytest.mark.skipif(tvm_unavailable_reason() is not None, reason=str(tvm_unavailable_reason()))


_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.runtime.cache import KernelCache
    cache = KernelCache()
    shape = gemm.padded(1, 30, 20, 40)
    t0 = time.perf_counter()
    fn = cache.get(shape)
    seconds = time.perf_counter() - t0
    A = torch.ones(1, shape.m, shape.k, dtype=torch.uint8)
    B = torch.ones(1, shape.n // 16, shape.k // 4, 16, 4, dtype=torch.int8)
    C = torch.empty(1, shape.m, shape.n, dtype=torch.int32)
    fn(A, B, C)
    print(json.dumps({"built": cache.stats.built, "loaded": cache.stats.loaded,
                      "seconds": seconds, "c": int(C[0, 0, 0])}))
""")


def _child(cache_dir, wait=True):
    env = dict(os.environ, FRACCOMPILE_CACHE_DIR=str(cache_dir))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return _result(proc) if wait else proc


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_reuses_the_cache(tmp_path):
    first = _child(tmp_path)
    assert first["built"] == 1 and first["c"] == 40
    second = _child(tmp_path)
    assert second == {**second, "built": 0, "loaded": 1, "c": 40}
    assert second["seconds"] < 0.1  # warm-cache load per kernel
    assert len(list(tmp_path.glob("gemm_*.so"))) == 1


def test_concurrent_builders_do_not_corrupt_the_cache(tmp_path):
    procs = [_child(tmp_path, wait=False) for _ in range(3)]
    results = [_result(p) for p in procs]
    assert sum(r["built"] for r in results) == 1  # the others waited for the lock, then loaded
    assert all(r["c"] == 40 for r in results)
    assert len(list(tmp_path.glob("gemm_*.so"))) == 1 and not list(tmp_path.glob("tmp*"))


def test_damaged_cache_file_is_rebuilt(tmp_path):
    from fraccompile.targets.kernels import gemm
    from fraccompile.targets.runtime.cache import KernelCache

    cache = KernelCache(tmp_path)
    shape = gemm.padded(1, 8, 16, 8)
    cache.path(shape).parent.mkdir(parents=True, exist_ok=True)
    cache.path(shape).write_bytes(b"not a shared library")
    cache.get(shape)
    assert cache.stats.built == 1
    assert KernelCache(tmp_path).get(shape) is not None


class _StandInGemm:
    """Stands in for the CUDA GEMM on CPU tensors: exact, and counts its calls."""

    max_k = 65_536

    def __init__(self):
        self.calls = 0

    def padded_shape(self, groups, m, n, k, kind=None):
        return SimpleNamespace(groups=groups, m=m, n=n, k=k)

    def kind_for(self, device):
        return "mma"

    def gemm(self, a, b, a_offset=None, b_offset=None, padded=None):
        from fraccompile.targets.runtime.cuda_driver import offset_terms

        self.calls += 1
        return a.long() @ b.long().mT + offset_terms(a, b, a_offset, b_offset, torch.int64)


def test_gpu_path_glue_matches_reference_with_a_stand_in_gemm(monkeypatch, tmp_path):
    """The device path of the backend (the CUDA quantization kernels, here in the CPU emulator of
    tests/_cuda_quant_helpers.py; no CPU pack kernels; the CUDA GEMM for every integer role) run
    on CPU tensors with an exact stand-in GEMM: same loss and gradients as the reference backend.
    On a GPU the stand-in is the TVM kernel (tests/test_cuda.py, tests/test_cuda_backend.py)."""
    from _cuda_quant_helpers import EmulatedQuantKernels

    from fraccompile.targets.backend import TVMBackend
    from fraccompile.targets.kernels import cuda_quantize

    monkeypatch.setattr(TVMBackend, "on_gpu", staticmethod(lambda t: True))
    for name in [n for n in dir(TVMBackend) if n.startswith("_gpu_conv")]:  # (im2col convs here)
        monkeypatch.setattr(TVMBackend, name, lambda *args, **kwargs: None)
    backend = TVMBackend()
    backend._cuda = _StandInGemm()
    emu = EmulatedQuantKernels(cuda_quantize, tmp_path)
    backend._cuda_quant = SimpleNamespace(launcher=lambda device: emu)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = C2(3, 16, 3, padding=1)
            self.b = C2(16, 16, 3, padding=1, stride=2)
            self.fc = torch.nn.Linear(16, 24)
            self.out = torch.nn.Linear(24, 10)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
            h = self.fc(h)
            h = h + (h.unsqueeze(2) @ h.unsqueeze(1)).mean(2)  # a matmul site
            return self.out(h)

    model = Net()
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 10, (6,))
    out = {}
    for be in ("reference", "tvm"):
        m = copy.deepcopy(model)
        fm = fraccompile.compile(
            m, x, FracConfig(scheme="symmetric", backend="reference", full_precision=("out",))
        )
        if be == "tvm":
            for op in fm.modules():
                if isinstance(op, FracOp):
                    op.backend = backend
        torch.manual_seed(1)
        loss = F.cross_entropy(fm(x), y)
        loss.backward()
        out[be] = (loss.detach(), [p.grad for p in m.parameters()])
    # fw + gc of the 3 conv/linear sites, eb of the linear (weight_scale="gemm", the default: an
    # integer GEMM; the strided conv's eb is fp32, the first conv's input needs none), fw + eb +
    # gc of the matmul
    assert backend._cuda.calls == 3 * 2 + 1 + 3
    assert rel(out["reference"][0], out["tvm"][0]) < TOL
    for r, g in zip(out["reference"][1], out["tvm"][1]):
        assert rel(r, g) < TOL
