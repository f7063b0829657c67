"""A small emulator of CUDA kernels on the CPU, for tests without a GPU.

A kernel's CUDA C (from its ``extern "C" __global__`` definition on) is compiled by g++ with a shim
(``threadIdx``/``blockIdx``, ``__syncthreads`` as a ``std::barrier``, ``__dp4a``, the vector types)
into ``emulate(void** args)``, which runs the grid block after block, the threads of a block
concurrently as ``std::thread`` s. So a schedule's indexing, shared-memory staging and
synchronization are checked exactly, without a GPU.
"""

import ctypes
import re
import shutil
import subprocess

import pytest

_SHIM = r"""
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>
struct U3 { unsigned x, y, z; };
static thread_local U3 threadIdx;
static U3 blockIdx;
static std::barrier<>* block_barrier;
#define __global__
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __syncthreads() block_barrier->arrive_and_wait()
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
static inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return c;
}
"""


class EmulatedKernel:
    """The CUDA C ``source`` of kernel ``name`` (parameters ``params``, launched on ``grid`` blocks
    of ``block`` threads), run on the CPU. ``launch(pointers)`` takes the buffer pointers in the
    kernel's parameter order. Skips the test without g++."""

    def __init__(self, source, name, grid, block, params, workdir, stem=None):
        if shutil.which("g++") is None:
            pytest.skip("g++ not found (needed to emulate the kernels)")
        self.grid, self.block, self.name, self.params = tuple(grid), tuple(block), name, tuple(params)
        body = source[source.index('extern "C" __global__') :]
        body = re.sub(r"__shared__\s+(alignas\(\d+\))", r"\1 static", body)
        body = body.replace("__shared__", "static")
        sig = re.search(r"\(([^)]*)\)\s*\{", body).group(1)
        types = [re.sub(r"__restrict__\s+\w+$", "", p).strip() for p in sig.split(",")]
        call = ", ".join(f"({t})args[{i}]" for i, t in enumerate(types))
        (gx, gy, gz), (bx, by, bz) = self.grid, self.block
        code = (
            _SHIM
            + body
            + f"""
extern "C" void emulate(void** args) {{
  const unsigned nt = {bx * by * bz};
  for (unsigned z = 0; z < {gz}; ++z) for (unsigned y = 0; y < {gy}; ++y)
  for (unsigned x = 0; x < {gx}; ++x) {{
    blockIdx = U3{{x, y, z}};
    std::barrier<> bar(nt);
    block_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; ++t) threads.emplace_back([=] {{
      threadIdx = U3{{t % {bx}, (t / {bx}) % {by}, t / {bx * by}}};
      {self.name}({call});
    }});
    for (auto& t : threads) t.join();
  }}
}}
"""
        )
        stem = stem or name
        cc, so = workdir / f"{stem}.cc", workdir / f"{stem}.so"
        cc.write_text(code)
        subprocess.run(
            ["g++", "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread", "-o", str(so), str(cc)],
            check=True,
        )
        self.lib = ctypes.CDLL(str(so))
        self.lib.emulate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def launch(self, pointers):
        self.lib.emulate((ctypes.c_void_p * len(pointers))(*pointers))
