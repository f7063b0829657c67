"""Distributed training: one process per device (or per group of cores) under ``torchrun``, every
precision decision the same in every process.

:func:`fraccompile.train.fit` uses this module when it runs under ``torchrun`` (``WORLD_SIZE``
set) or in a process group you initialized; see ``docs/distributed.md``. What it does:

* :func:`setup` joins the process group (gloo on CPU, NCCL on CUDA) with a timeout, and splits the
  machine's cores between the processes on it (:func:`split_threads`).
* :func:`wrap` puts the model in ``DistributedDataParallel`` (``"ddp"``) or shards it with FSDP2's
  ``fully_shard`` (``"fsdp"``).
* :func:`agreed_ranges` installs the activation-range all-reduce of :mod:`fraccompile.ops.modules`
  (MIN of the minima, MAX of the maxima), so every process quantizes its activations with the grid
  of the global batch. Weights are the same everywhere; gradient ranges stay per process (the
  weight gradients are averaged by DDP afterwards).
* :meth:`Context.mean` / :meth:`Context.sum_` reduce what the schedules and the log read: the
  step's loss (PFQ's indicator), the cost ratio (DFQ's regularizer sign), period statistics,
  gate shares and per-class counts, the cost meter.
* :func:`launch` starts ``nproc`` local processes (``fraccompile train --nproc-per-node``) and
  turns a process that died into one :class:`DistributedError` naming it.

Nothing here imports ``tvm``; ``torch.distributed`` is imported by torch itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, FracCompileError
from .fitconfig import PARALLEL
from .ops import modules as op_modules

THREADS_ENV = "FRACCOMPILE_NUM_THREADS"  # threads per process (default: cores / local processes)


class DistributedError(FracCompileError):
    """A process of a distributed run died or stopped answering; the message names it and the
    checkpoint to resume from."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run: ``rank`` of ``world_size`` processes, the
    ``local_rank`` of ``local_world_size`` on this machine, and how the model is parallel
    (``"none"``, ``"ddp"`` or ``"fsdp"``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    parallel: str = "none"
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() initialized the process group (teardown() destroys it)

    @property
    def active(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the log, the checkpoint and ``run.json``."""
        return self.rank == 0

    # -- reductions (every process calls them in the same order) ---------------------------------
    def mean(self, values: list[float]) -> list[float]:
        """The mean over the processes of each value (one all-reduce)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def mean_one(self, value: float) -> float:
        return self.mean([value])[0]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in place (on the process group's device)."""
        if self.active:
            moved = t.to(self.device)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)
        return t

    def any_(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), by rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` in every process."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={os.environ[name]!r} is not an integer") from None


def launched() -> bool:
    """Whether this process is one of several that torchrun (or :func:`launch`) started."""
    return _env_int("WORLD_SIZE", 1) > 1


def setup(parallel: str = "auto", timeout: float = 600.0) -> Context:
    """This process's :class:`Context`. ``"auto"``: DDP when a process group of more than one
    process exists or this process was started by torchrun, else none. Initializes the process
    group from torchrun's environment when there is none yet (gloo on CPU, NCCL with CUDA),
    with ``timeout`` seconds for every collective, and splits the cores between the processes of
    this machine."""
    if parallel not in PARALLEL:
        raise ConfigError(f"distributed {parallel!r}: choose {', '.join(PARALLEL)}")
    if parallel == "none":
        return Context()
    owns = False
    if not dist.is_initialized():
        if not launched():
            if parallel == "auto":
                return Context()
            raise ConfigError(
                f"distributed={parallel!r} needs several processes: start them "
                "with torchrun (or `fraccompile train --nproc-per-node N`), or "
                "initialize a process group first"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        owns = True
    world = dist.get_world_size()
    if world == 1 and parallel == "auto":
        return Context(owns_group=owns)
    local_world = _env_int("LOCAL_WORLD_SIZE", world if not launched() else 1)
    local_rank = _env_int("LOCAL_RANK", dist.get_rank() % max(local_world, 1))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    ctx = Context(
        dist.get_rank(),
        world,
        local_rank,
        local_world,
        "ddp" if parallel == "auto" else parallel,
        device,
        owns,
    )
    split_threads(local_world)
    return ctx


def teardown(ctx: Context) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def split_threads(local_processes: int) -> int:
    """Give this process its share of the cores: ``$FRACCOMPILE_NUM_THREADS``, else the cores it
    may run on divided by the processes on this machine (at least 1). Sets torch's intra-op
    threads, which also run the TVM kernels' parallel loops (:mod:`fraccompile.targets.runtime.threads`),
    and ``TVM_NUM_THREADS`` for TVM's own pool (``FRACCOMPILE_THREADS=tvm``)."""
    n = _env_int(THREADS_ENV, 0)
    if n < 1:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        n = max(1, cores // max(local_processes, 1))
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)
    return n


# -- the model ---------------------------------------------------------------------------------------
def wrap(model: torch.nn.Module, ctx: Context, **ddp_options) -> torch.nn.Module:
    """The module to run forward on: ``model`` in DistributedDataParallel, or ``model`` itself
    sharded with ``fully_shard`` (FSDP2), or ``model`` unchanged."""
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # the tvm backend returns some weight gradients channels-last: DDP copies them into its
        # buckets, which is right, and says so once per process
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **ddp_options)
    if ctx.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "__dict__", {}).get("_frac_eval") is not None:
            raise ConfigError(
                "distributed='fsdp' does not shard a model with a separate eval-mode "
                "graph (captured with torch.export): use distributed='ddp'"
            )
        fully_shard(model)
        return model
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds (an FSDP2 parameter or gradient is a DTensor)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_state(model: torch.nn.Module, optimizer, ctx: Context) -> tuple[dict, dict]:
    """(model state, optimizer state) as one process would have them, for the checkpoint: the
    module's own under DDP (every process holds all of it), gathered to rank 0 under FSDP2
    (every process must call this; ranks other than 0 get empty dicts)."""
    if ctx.parallel != "fsdp":
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_full_state(
    model: torch.nn.Module, optimizer, model_state: dict, optim_state: dict, ctx: Context
) -> None:
    """Inverse of :func:`full_state`."""
    if ctx.parallel != "fsdp":
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


# -- agreement -------------------------------------------------------------------------------------
@contextlib.contextmanager
def agreed_ranges(ctx: Context) -> Iterator[None]:
    """While active, every site's activation range is the range over all processes' batches."""
    if not ctx.active:
        yield
        return

    def reduce(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.stack([-lo.float(), hi.float()])  # one all-reduce: MAX of (-min, max)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return (-t[0]).to(lo.dtype), t[1].to(hi.dtype)

    previous = op_modules.set_range_reducer(reduce)
    try:
        yield
    finally:
        op_modules.set_range_reducer(previous)


def shard_data(data, ctx: Context):
    """``data`` as this process sees it: ``data.shard(rank, world_size)``."""
    if not ctx.active:
        return data
    if getattr(data, "world_size", 1) == ctx.world_size and getattr(data, "rank", 0) == ctx.rank:
        return data  # sharded by the caller
    shard = getattr(data, "shard", None)
    if not callable(shard):
        raise ConfigError(
            f"{type(data).__name__} has no shard(rank, world_size): every process "
            "would train on the same batches (see fraccompile.data)"
        )
    return shard(ctx.rank, ctx.world_size)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process died or hung."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text
        for s in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out",
            "timed out",
            "Broken pipe",
            "NCCL communicator was aborted",
            "Gloo",
        )
    )


def peer_failure(
    err: BaseException, ctx: Context, iteration: int, checkpoint: str | None, saved_at: int | None
) -> DistributedError:
    """The one-line error of a run whose collective failed after ``iteration`` iterations."""
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    kept = (
        f"the last checkpoint, {checkpoint} (iteration {saved_at}), is intact: resume from "
        f"it with {ctx.world_size} processes"
        if checkpoint and saved_at is not None
        else "no checkpoint was written"
    )
    return DistributedError(
        f"training stopped after iteration {iteration}: process {ctx.rank} of "
        f"{ctx.world_size} lost another process of the run (it died or did "
        f"not answer within the timeout: {first}); {kept}"
    )


# -- starting processes ----------------------------------------------------------------------------
def launch(nproc: int, fn: Callable[..., Any], *args) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` new processes on this machine (torch's elastic launcher,
    the one torchrun uses, with a local rendezvous and no restarts); returns their results by
    rank. A process that fails raises :class:`DistributedError` naming it, its exit code and
    its error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id="fraccompile",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as err:
        parts = []
        for rank, failure in sorted(err.failures.items()):
            how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
            message = failure.message
            if isinstance(message, dict):  # what torch's error handler recorded
                message = message.get("message", "")
            lines = [
                line for line in str(message or "").strip().splitlines() if "To enable traceback" not in line
            ]
            parts.append(f"process {rank} failed ({how}" + (f": {lines[-1][:300]}" if lines else "") + ")")
        raise DistributedError("; ".join(parts)) from None
    return [results[r] for r in sorted(results)]
