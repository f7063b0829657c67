"""The parallel loops of the CPU kernels, run on torch's OpenMP threads instead of TVM's own pool.

A TVM kernel compiled for the CPU runs its ``parallel`` loop through a function pointer the
library holds, ``__TVMBackendParallelLaunch(lambda, cdata, num_task)``, which the runtime points at
TVM's thread pool when it loads the library. In a training step the kernels alternate with torch
ops, and torch runs those on its OpenMP team, whose threads spin for a while after each op: a TVM
worker woken next to a spinning OpenMP thread shares its core with it: ResNet-20's GEMM
kernels ran markedly slower on TVM's pool than on torch's team
(``bench/step_breakdown.py``; docs/tvm.md, "Threads").

:func:`adopt` re-points that function pointer of a loaded library at a small launcher (C, below)
that runs the tasks inside ``GOMP_parallel`` of the OpenMP runtime torch loaded, so the kernel's
tasks go to the threads that are already awake. The team has ``omp_get_max_threads()`` threads of
the calling thread, so ``torch.set_num_threads`` sets the kernels' threads too. Each thread runs
tasks ``id, id + team, ...``, so a smaller team than asked for (nested regions, dynamic teams)
still runs every task.

The launcher is compiled once per machine into the kernel cache directory (needs ``cc``, as the
kernel cache does), with its checksum next to it: a damaged one is rebuilt, never loaded.
``FRACCOMPILE_THREADS=tvm`` keeps TVM's pool; without a C compiler, without an OpenMP runtime in
the process (a torch built without OpenMP) or for a library that could not be written to disk
(built in memory), the kernels run on TVM's pool, and :func:`pool` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import subprocess
import tempfile

from ... import fileio
from . import cache_dir

log = logging.getLogger("fraccompile.targets")

ENV = "FRACCOMPILE_THREADS"
MODES = ("openmp", "tvm")

# TVM's ABI (include/tvm/runtime/c_backend_api.h): FTVMParallelLambda and TVMParallelGroupEnv.
# ``sync_handle`` serves TVMBackendParallelBarrier, which the kernels here never call (adopt()
# refuses a library that imports it).
LAUNCHER_C = r"""
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } penv_t;
typedef int (*lambda_t)(int task_id, penv_t* penv, void* cdata);

static void (*gomp_parallel)(void (*)(void*), void*, unsigned, unsigned);
static int (*omp_thread_num)(void);
static int (*omp_num_threads)(void);
static int (*omp_max_threads)(void);

struct job { lambda_t f; void* cdata; penv_t env; volatile int err; };

static void run_tasks(void* p) {
  struct job* j = (struct job*)p;
  int team = omp_num_threads();
  for (int t = omp_thread_num(); t < j->env.num_task; t += team) {
    int r = j->f(t, &j->env, j->cdata);
    if (r != 0) j->err = r;
  }
}

int fc_init(void* parallel, void* thread_num, void* num_threads, void* max_threads) {
  gomp_parallel = (void (*)(void (*)(void*), void*, unsigned, unsigned))parallel;
  omp_thread_num = (int (*)(void))thread_num;
  omp_num_threads = (int (*)(void))num_threads;
  omp_max_threads = (int (*)(void))max_threads;
  return 0;
}

int fc_parallel_launch(lambda_t f, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : omp_max_threads();
  struct job j = {f, cdata, {0, n}, 0};
  if (n <= 1) run_tasks(&j);
  else gomp_parallel(run_tasks, &j, (unsigned)n, 0u);
  return j.err;
}
"""

_LOADED: list = []  # the launcher library, kept loaded
_OMP_NAMES = ("libgomp", "libiomp5", "libomp")
_SYMBOLS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "omp_get_max_threads")


def mode() -> str:
    value = os.environ.get(ENV, "openmp").strip().lower() or "openmp"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def openmp_library() -> str | None:
    """The path of the OpenMP runtime loaded in this process (torch's), if any."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "/" in line}
    except OSError:
        return None
    found = sorted(
        p for p in paths if os.path.basename(p).startswith(_OMP_NAMES) and ".so" in os.path.basename(p)
    )
    torch_own = [p for p in found if f"{os.sep}torch{os.sep}lib{os.sep}" in p]
    return (torch_own or found or [None])[0]


def _compile(path: pathlib.Path) -> None:
    """Build the launcher into ``path`` (under a lock, in a build directory next to it, renamed
    into place with its checksum, as the kernel cache does) unless a whole one is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.locked(path):
        if path.exists() and fileio.checksum_problem(path) is None:
            return
        with tempfile.TemporaryDirectory(prefix=path.name + ".", suffix=".tmp", dir=path.parent) as tmp:
            src, out = os.path.join(tmp, "launch.c"), os.path.join(tmp, "launch.so")
            with open(src, "w") as f:
                f.write(LAUNCHER_C)
            cc = os.environ.get("CC", "cc")
            proc = subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-o", out, src], capture_output=True, text=True, timeout=120
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {(proc.stderr or proc.stdout).strip()[:300]}")
            with fileio.atomic_path(path, suffix=".so") as dst:
                os.replace(out, dst)
            fileio.write_checksum(path)


@functools.lru_cache(maxsize=None)
def _launcher() -> tuple[int | None, str]:
    """(address of fc_parallel_launch, description) or (None, why not)."""
    if mode() == "tvm":
        return None, f"TVM's thread pool ({ENV}=tvm)"
    omp = openmp_library()
    if omp is None:
        return None, "TVM's thread pool (no OpenMP runtime loaded in this process)"
    try:
        runtime = ctypes.CDLL(omp)
        symbols = [ctypes.cast(getattr(runtime, s), ctypes.c_void_p) for s in _SYMBOLS]
        digest = hashlib.sha256(LAUNCHER_C.encode()).hexdigest()[:16]
        path = cache_dir() / f"omp_launch-{digest}.so"
        if not path.exists() or fileio.checksum_problem(path) is not None:
            _compile(path)
        launcher = ctypes.CDLL(str(path))
        launcher.fc_init(*symbols)
        address = ctypes.cast(launcher.fc_parallel_launch, ctypes.c_void_p).value
    except Exception as e:  # no compiler, unwritable cache, a runtime without the GOMP entry
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("kernels run on TVM's thread pool: cannot use %s (%s)", omp, why)
        return None, f"TVM's thread pool (the OpenMP launcher failed: {why})"
    _LOADED.append(launcher)
    return address, f"torch's OpenMP threads ({os.path.basename(omp)})"


def pool() -> str:
    """Which threads run the kernels' parallel loops, in words."""
    return _launcher()[1]


def on_openmp() -> bool:
    """Whether loaded kernels run their parallel loops on torch's OpenMP threads."""
    return _launcher()[0] is not None


def adopt(library: str | os.PathLike) -> bool:
    """Point the parallel launch of the loaded shared library ``library`` (a kernel TVM exported
    and ``tvm.runtime.load_module`` loaded) at torch's OpenMP team. False, and the library keeps
    TVM's pool, when that is not possible (see :func:`pool`)."""
    address, _ = _launcher()
    if address is None:
        return False
    lib = ctypes.CDLL(os.fspath(library))  # the handle the runtime holds: dlopen is refcounted
    try:
        lib["__TVMBackendParallelBarrier"]
        return False  # its tasks synchronise through TVM's pool
    except AttributeError:
        pass
    try:
        slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
    except ValueError:  # no parallel loop in this library
        return False
    slot.value = address
    return True
