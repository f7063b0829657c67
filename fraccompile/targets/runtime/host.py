"""Host detection: which x86 integer-dot instructions this CPU has, and the TVM target for it."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# Set before ``import tvm``, unless the user set them:
# * the TVM thread pool defaults to what it takes for the physical cores, which on some VMs is one:
#   use every core this process may run on;
# * TVM's workers spin after each kernel, waiting for the next, and so do torch's OpenMP threads
#   after each torch op: in a training step the two pools alternate, and each spins on the cores
#   the other needs. Turning TVM's spinning off made a training step on the tvm backend much
#   faster on 2 cores (docs/tvm.md, "Threads"; CHANGELOG.md). ``OMP_WAIT_POLICY=PASSIVE``
#   does the same for torch's side, but it must be set before torch is imported, so it is left to
#   the user.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
os.environ.setdefault("TVM_NUM_THREADS", str(_CORES))
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import tvm  # noqa: E402
from tvm.target import codegen  # noqa: E402


@dataclass(frozen=True)
class HostTarget:
    """``isa`` is ``avx512-vnni``, ``avx512bw`` or ``avx2`` (the dot-product instructions used)."""

    mcpu: str
    isa: str
    num_cores: int

    def target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.num_cores})

    @property
    def key(self) -> str:
        """What a compiled kernel depends on (part of the cache key)."""
        return f"llvm-{self.mcpu}-{self.isa}-tvm{tvm.__version__}"


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def detect() -> HostTarget:
    """The target for this machine. ``FRACCOMPILE_ISA=avx512-vnni|avx512bw|avx2`` forces a lower
    instruction set (for testing the other code paths on a VNNI machine)."""
    flags = _flags()
    mcpu = codegen.llvm_get_system_cpu() or "x86-64"
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        isa = "avx512-vnni"
    elif "avx512bw" in flags:
        isa = "avx512bw"
    else:
        isa = "avx2"
    forced = os.environ.get("FRACCOMPILE_ISA")
    if forced:
        order = ["avx2", "avx512bw", "avx512-vnni"]
        if forced not in order:
            raise ValueError(f"FRACCOMPILE_ISA={forced!r}: expected one of {', '.join(order)}")
        if order.index(forced) > order.index(isa):
            raise ValueError(f"FRACCOMPILE_ISA={forced!r}: this CPU only has {isa}")
        isa = forced
    cores = int(os.environ["TVM_NUM_THREADS"])
    return HostTarget(mcpu=mcpu, isa=isa, num_cores=cores)
