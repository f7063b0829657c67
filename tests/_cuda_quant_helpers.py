"""The CUDA quantization kernels (fraccompile.targets.kernels.cuda_quantize) on the CPU, for tests
without a GPU: every generated kernel compiled into one library of the emulator of
``tests/_cuda_emulator.py``, called as a ``Launcher`` (``launch(name, grid, block, args)``).

The emulator builds one kernel with its grid fixed; here every generated kernel is compiled into
one library behind a dispatcher kernel (``fq_dispatch``, whose argument array holds the kernel
index and the kernel's arguments), and the grid's x extent is a variable (``fq_grid_x``) set per
launch, so one g++ build serves every launch. A small shim gives the CUDA functions the kernels
use (the ``__f*_rn`` intrinsics as plain IEEE operations: x86-64 g++ at -O1 without -march emits
no FMA, so nothing is contracted). Skips the test without g++ (the emulator's rule).
"""

import ctypes
import re

import torch
from _cuda_emulator import EmulatedKernel

_SHIM = r"""
#include <algorithm>
#include <cmath>
using std::max;
using std::min;
#define uint unsigned int
#define CUDART_INF_F INFINITY
#define __fsub_rn(a, b) ((float)(a) - (float)(b))
#define __fadd_rn(a, b) ((float)(a) + (float)(b))
#define __fdiv_rn(a, b) ((float)(a) / (float)(b))
extern "C" unsigned fq_grid_x = 1;
"""
_DISPATCH = 'extern "C" __global__ void fq_dispatch(long long* __restrict__ argv_ptr)'


class EmulatedQuantKernels:
    """Every kernel of :data:`cuda_quantize.KERNELS` on the CPU; called as a ``Launcher``."""

    def __init__(self, cq, workdir):
        names = [k.name for k in cq.KERNELS]
        decls, defs, cases = [], [], []
        for i, name in enumerate(names):
            low = cq.lower(cq.KERNELS[i])
            text = low.source[low.source.index('extern "C" __global__') :]
            decl, _, definition = text.partition(";\n")
            decls.append(decl + ";")
            defs.append(definition)
            sig = re.search(rf"{name}\(([^)]*)\)", decl).group(1).split(",")
            args = [
                f"({p.split('__restrict__')[0].strip()})argv_ptr[{j + 1}]"
                if "*" in p
                else f"(int)argv_ptr[{j + 1}]"
                for j, p in enumerate(sig)
            ]
            cases.append(f"    case {i}: {name}({', '.join(args)}); break;")
        source = "\n".join(
            [
                _DISPATCH + ";",
                _SHIM,
                *decls,
                _DISPATCH + " {\n  switch (argv_ptr[0]) {\n" + "\n".join(cases) + "\n  }\n}",
                *defs,
            ]
        )
        self.index = {n: i for i, n in enumerate(names)}
        self.kernel = EmulatedKernel(
            source, "fq_dispatch", ("fq_grid_x", 1, 1), (256, 1, 1), ["argv"], workdir
        )
        self.grid_x = ctypes.c_uint.in_dll(self.kernel.lib, "fq_grid_x")
        self.launched = []

    def __call__(self, name, grid, block, args):
        assert block == (256, 1, 1) and grid[1:] == (1, 1) and grid[0] >= 1
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else int(a) for a in args]
        argv = torch.tensor([self.index[name], *values], dtype=torch.int64)
        self.grid_x.value = grid[0]
        self.kernel.launch([argv.data_ptr()])
        self.launched.append((name, grid[0]))
