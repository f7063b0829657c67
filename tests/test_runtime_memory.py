"""Freed memory kept for the next step (fraccompile/targets/runtime/memory.py): measured by the page
faults a second round of the same allocations takes, in fresh processes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from fraccompile.targets import tvm_unavailable_reason
from fraccompile.targets.runtime import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 8 blocks of 16 MiB allocated, freed, and allocated again: how many pages the second round faults in
ROUNDS = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from fraccompile.targets.runtime import memory
    before = memory.policy()
    if sys.argv[1] == "backend":
        from fraccompile.targets.backend import TVMBackend
        TVMBackend()
    else:
        memory.keep_freed_memory()
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(4 << 20) for _ in range(8)]
    del blocks
    f0 = faults()
    blocks = [torch.ones(4 << 20) for _ in range(8)]
    print(json.dumps({"faults": faults() - f0, "before": before, "policy": memory.policy()}))
    """
)


def _second_round(how: str, **env) -> dict:
    full = {k: v for k, v in os.environ.items() if k != memory.ENV and not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, how], env={**full, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the policy sets glibc's thresholds")
def test_a_backend_keeps_freed_memory_for_reuse_without_page_faults():
    # (a TVM backend sets the policy when made; without tvm, the call it makes)
    kept = _second_round("backend" if tvm_unavailable_reason() is None else "call")
    system = _second_round("call", FRACCOMPILE_MALLOC="system")
    assert kept["before"] == system["before"] == "the C library's defaults (not set yet)"
    assert kept["policy"].startswith("kept"), kept
    assert system["policy"] == "the C library's defaults (FRACCOMPILE_MALLOC=system)"
    # glibc's defaults hand the freed blocks back and fault them in again; the policy reuses them
    # (small allocations in between may take a piece of the freed space: a block more at most)
    pages = 8 * (16 << 20) // 4096
    assert system["faults"] > pages // 2, system
    assert kept["faults"] <= pages // 4, kept


def test_a_bad_policy_name_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "_state", None)
    monkeypatch.setenv(memory.ENV, "jemalloc")
    with pytest.raises(ValueError, match="FRACCOMPILE_MALLOC='jemalloc'"):
        memory.keep_freed_memory()
