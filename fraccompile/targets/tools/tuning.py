"""Tuning the GEMM template for a machine: a measured search over its tiles, kept in a database.

Every site role is one batched GEMM (:mod:`..kernels.gemm`) whose schedule has three free parameters, the
tile ``(mb, nb, kb)``: rows of A and 16-lane column vectors of B per register block, and the
reduction block. :func:`tune` measures candidate tiles of each GEMM problem ``(G, M, N, K)`` (the
default tile first), keeps the fastest, and re-measures it against the default before recording it,
so a tuned kernel is never slower than the untuned one within the measurement's noise (in five
alternating, longer re-measurements it must win four times and by 3% in the median). GOPS count
the unpadded problem (``2·G·M·N·K`` per call), so a tile that pads more pays for it.

Why a template search rather than MetaSchedule: on these 2-core machines MetaSchedule's
``tune_tir`` built no valid candidate for a 256³ u8·s8 GEMM in 16 trials (builder timeout raised
to 120 s), where this search found a fast kernel in seconds (``python bench/tune.py
--metaschedule 256``, docs/benchmarks.md); its space is also mostly schedules the VNNI template
already rules out.

The database (:class:`~..runtime.tuning_db.TuningDB`, ``<dir>/tuning.json``) is read by the
kernel providers at run time, so it lives in the runtime layer; ``tune`` only measures problems it
has not seen. Measurements run in this process or, with an RPC tracker, on a remote server
(:class:`RPCRunner`).
"""

from __future__ import annotations

import pathlib
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tvm

from ..kernels import gemm
from ..runtime.host import HostTarget, detect
from ..runtime.tuning_db import TuneRecord, TuningDB

CONFIRM = 5  # alternating default/winner re-measurements before a tuned tile is recorded: the
MARGIN = 0.03  # winner must be this much faster in their medians, and faster in all but one pair
MAX_ZMM = 32  # mb·nb accumulators + nb B vectors + 1 broadcast A must fit in the zmm registers


# -- the search space -------------------------------------------------------------------------------
def space(problem) -> list[gemm.Tile]:
    """Every tile worth trying for ``problem``: register blocks that fit the zmm file and do not
    exceed the (16-padded) problem, reduction blocks of 8..256."""
    G, M, N, K = problem
    n16 = -(-N // 16)
    k4 = -(-K // 4) * 4
    out = []
    for mb in range(1, 9):
        if mb > max(M, 1):
            break
        for nb in range(1, 7):
            if nb > n16 or mb * nb + nb + 1 > MAX_ZMM:
                continue
            for kb in (8, 16, 32, 64, 128, 256):
                if kb <= max(k4, 8):
                    out.append(gemm.Tile(mb, nb, kb))
    return out


def candidates(problem, trials: int, seed: int = 0) -> list[gemm.Tile]:
    """The default tile, then ``trials - 1`` others drawn from :func:`space` (seeded).

    When the default tile fits ``M`` and ``K`` exactly, so do the others: the backend can then hand
    its A operand to the kernel as it is, and a tile that pads it forces a copy of A on every call,
    a cost the kernel-only measurement does not see and that can exceed what the tile saves."""
    default = gemm.default_tile(*problem[1:])
    G, M, N, K = problem
    exact = gemm.padded(*problem, default)
    rest = [t for t in space(problem) if t != default]
    if (exact.m, exact.k) == (M, K):
        rest = [t for t in rest if M % t.mb == 0 and K % t.kb == 0]
    random.Random(seed).shuffle(rest)
    return [default, *rest[: max(trials - 1, 0)]]


# -- measuring ------------------------------------------------------------------------------------
def _operands(shape: gemm.GemmShape, seed: int = 0):
    rng = np.random.default_rng(seed)
    g, m, n, k = shape.groups, shape.m, shape.n, shape.k
    a = rng.integers(0, 256, (g, m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (g, n // 16, k // 4, 16, 4), dtype=np.int8)
    return a, b, np.zeros((g, m, n), dtype=np.int32)


class LocalRunner:
    """Builds and times kernels in this process (TVM's ``time_evaluator``: median of ``repeat``
    runs of at least ``min_repeat_ms`` each)."""

    name = "local"

    def __init__(
        self, host: HostTarget | None = None, repeat: int = 5, min_repeat_ms: int = 40, confirm_ms: int = 100
    ):
        self.host = host or detect()
        self.repeat, self.min_repeat_ms, self.confirm_ms = repeat, min_repeat_ms, confirm_ms
        self._built: dict[gemm.GemmShape, object] = {}  # the confirmation re-times two kernels

    def build(self, shape: gemm.GemmShape):
        lib = self._built.get(shape)
        if lib is None:
            if len(self._built) > 64:
                self._built.clear()
            lib = self._built[shape] = gemm.build(shape, self.host)
        return lib

    def time(self, shape: gemm.GemmShape, confirm: bool = False) -> float:
        """Median seconds per call (``confirm``: the longer measurement of the confirmation)."""
        lib = self.build(shape)
        dev = tvm.cpu(0)
        args = [tvm.runtime.tensor(x, dev) for x in _operands(shape)]
        f = lib.mod.time_evaluator(
            "main",
            dev,
            number=1,
            repeat=self.repeat,
            min_repeat_ms=self.confirm_ms if confirm else self.min_repeat_ms,
        )
        return statistics.median(f(*args).results)


class RPCRunner(LocalRunner):
    """Builds here, measures on a server registered with an RPC tracker under ``key`` (TVM's
    ``tvm.rpc``: start ``python -m tvm.exec.rpc_tracker`` and ``python -m tvm.exec.rpc_server
    --tracker HOST:PORT --key KEY`` on the machines). Kernels are built for this host's target, so
    the server must have the same CPU (a fleet of identical machines)."""

    name = "rpc"

    def __init__(self, address: str, host: HostTarget | None = None, **kwargs):
        super().__init__(host, **kwargs)
        self.tracker_host, self.tracker_port, self.key = parse_rpc(address)
        self._session = None
        self._loaded: dict[gemm.GemmShape, object] = {}  # remote modules
        self._tmp = tempfile.TemporaryDirectory(prefix="fraccompile-rpc-")

    def session(self):
        if self._session is None:
            from tvm import rpc

            tracker = rpc.connect_tracker(self.tracker_host, self.tracker_port)
            self._session = tracker.request(self.key, priority=1, session_timeout=600)
        return self._session

    def time(self, shape: gemm.GemmShape, confirm: bool = False) -> float:
        remote = self.session()
        rlib = self._loaded.get(shape)
        if rlib is None:  # upload each kernel once: overwriting a library the server has loaded
            lib = self.build(shape)  # crashes it
            path = pathlib.Path(self._tmp.name) / f"{shape.name}.so"
            lib.export_library(str(path))
            remote.upload(str(path))
            rlib = self._loaded[shape] = remote.load_module(path.name)
        dev = remote.cpu(0)
        args = [tvm.runtime.tensor(x, dev) for x in _operands(shape)]
        f = rlib.time_evaluator(
            "main",
            dev,
            number=1,
            repeat=self.repeat,
            min_repeat_ms=self.confirm_ms if confirm else self.min_repeat_ms,
        )
        return statistics.median(f(*args).results)


def parse_rpc(address: str) -> tuple[str, int, str]:
    """``HOST:PORT:KEY`` -> ``(host, port, key)``."""
    parts = address.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit():
        raise ValueError(
            f"--rpc {address!r} must be HOST:PORT:KEY (an RPC tracker and the key its "
            "servers registered under), e.g. 127.0.0.1:9190:cpu"
        )
    return parts[0], int(parts[1]), parts[2]


def _gops(problem, seconds: float) -> float:
    G, M, N, K = problem
    return 2 * G * M * N * K / seconds / 1e9


@dataclass
class TuneResult:
    record: TuneRecord
    reused: bool  # found in the database: nothing was measured


def tune_problem(problem, runner, trials: int, deadline: float | None = None, seed: int = 0) -> TuneRecord:
    """Search ``problem``'s tiles (at most ``trials``, stopping at ``deadline``); the best one,
    confirmed against the default by alternating re-measurements."""
    t0 = time.perf_counter()
    problem = tuple(problem)
    tiles = candidates(problem, trials, seed)
    times: dict[gemm.Tile, float] = {}
    for i, tile in enumerate(tiles):
        if i and deadline is not None and time.monotonic() > deadline:
            break
        times[tile] = runner.time(gemm.padded(*problem, tile))
    default = tiles[0]
    best = min(times, key=times.get)
    if best != default:  # confirm: the search's winner may be noise; keep it only if it still
        # wins by MARGIN in alternating re-measurements
        pairs = [
            (
                runner.time(gemm.padded(*problem, default), confirm=True),
                runner.time(gemm.padded(*problem, best), confirm=True),
            )
            for _ in range(CONFIRM)
        ]
        times[default] = statistics.median([d for d, _ in pairs])
        times[best] = statistics.median([b for _, b in pairs])
        wins = sum(b < d for d, b in pairs)
        if times[best] > times[default] * (1 - MARGIN) or wins < CONFIRM - 1:
            best = default
    host = runner.host
    return TuneRecord(
        host=host.key,
        source=gemm.source_hash(),
        problem=problem,
        tile=(best.mb, best.nb, best.kb),
        default_tile=(default.mb, default.nb, default.kb),
        gops=_gops(problem, times[best]),
        default_gops=_gops(problem, times[default]),
        trials=len(times),
        seconds=time.perf_counter() - t0,
    )


def tune(
    problems,
    db: TuningDB,
    runner=None,
    trials: int = 16,
    time_budget: float | None = None,
    seed: int = 0,
    progress=None,
) -> list[TuneResult]:
    """Tune every problem ``db`` does not hold yet for this host; returns one result per problem.
    ``progress(done_problem_index, result)`` is called after each; ``time_budget`` (seconds) stops
    the search early: problems left over keep the default tile and are not recorded."""
    runner = runner or LocalRunner()
    deadline = time.monotonic() + time_budget if time_budget else None
    out = []
    for i, problem in enumerate(problems):
        rec = db.get(runner.host, problem)
        if rec is not None:
            out.append(TuneResult(rec, reused=True))
        elif deadline is not None and time.monotonic() > deadline:
            continue
        else:
            rec = tune_problem(problem, runner, trials, deadline, seed)
            db.put(rec)
            out.append(TuneResult(rec, reused=False))
        if progress is not None:
            progress(i, out[-1])
    return out
