"""Training throughput on one machine: 1 process x N threads against N processes x 1 thread
(DistributedDataParallel over gloo), fp32 and the tvm backend.

The same global batch (``--batch``) in both: one process takes all of it with ``--threads``
threads; ``--threads`` processes take ``batch / threads`` each, one thread each
(``FRACCOMPILE_NUM_THREADS=1``), started by :func:`fraccompile.distributed.launch` as
``fraccompile train --nproc-per-node`` starts them. A step is what ``fit`` does per iteration:
zero_grad, forward (activation ranges all-reduced across processes), loss, backward (DDP averages
the gradients), SGD update, the loss all-reduced for the schedule, ``frac_step``. Rows:

* ``fp32``: the model compiled at precision 0 (every site runs the original op);
* ``tvm 8/8/8``: ``backend="tvm"``, ``scheme="symmetric"``, static 8/8/8 (the kernel cache is
  warmed by ``--warmup`` steps; a build is never timed).

Each configuration runs ``--warmup`` steps, then ``--repeats`` timed blocks of ``--steps`` steps;
the table shows the median block's time per step (in a distributed run, the slowest process's) and
the global batch's images per second. The machine's load average is printed before and after:
other programs running at the same time slow either side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import header, print_table  # noqa: E402


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _measure(kind: str, batch: int, warmup: int, steps: int, repeats: int) -> list[float]:
    """Seconds per step of each timed block, in this process (one of several, or alone)."""
    import fraccompile
    from fraccompile import distributed
    from fraccompile.control import Static
    from fraccompile.examples.resnet_cifar import resnet20
    from fraccompile.fitconfig import FitConfig, make_optimizer

    ctx = distributed.setup("auto", timeout=600)
    cfg = (
        fraccompile.FracConfig(a=0, w=0, g=0)
        if kind == "fp32"
        else fraccompile.FracConfig(a=8, w=8, g=8, backend="tvm", scheme="symmetric")
    )
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    model = fraccompile.compile(resnet20(), x, cfg)
    model.use_schedule(Static(cfg.a, cfg.w, cfg.g))
    module = distributed.wrap(model, ctx)
    opt = make_optimizer(model.parameters(), FitConfig(iters=1, lr=0.01))

    def step():
        out = module(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.frac_step(ctx.mean_one(loss.item()) if ctx.active else loss.item())

    blocks = []
    with distributed.agreed_ranges(ctx):
        for _ in range(warmup):
            step()
        for _ in range(repeats):
            ctx.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            ctx.barrier()
            blocks.append((time.perf_counter() - t0) / steps)
    distributed.teardown(ctx)
    return blocks


def _worker(kind, batch, warmup, steps, repeats):
    return _measure(kind, batch, warmup, steps, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads of the one process, and the number of processes of the other side (default 2)",
    )
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks")
    p.add_argument("--kinds", default="fp32,tvm", help="fp32,tvm")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: the one-process side
    args = p.parse_args()
    if args.one:
        torch.set_num_threads(args.threads)
        blocks = _measure(args.one, args.batch, args.warmup, args.steps, args.repeats)
        print(" ".join(f"{b:.6f}" for b in blocks))
        return

    from fraccompile.distributed import launch

    header("training throughput: 1 process x N threads vs N processes x 1 thread (ResNet-20)")
    n = args.threads
    print(
        f"global batch {args.batch}; {args.warmup} warm-up steps, then {args.repeats} blocks "
        f"of {args.steps} steps; load average before: {_loadavg()}"
    )
    print()
    rows = []
    for kind in args.kinds.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            kind,
            "--threads",
            str(n),
            "--batch",
            str(args.batch),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--repeats",
            str(args.repeats),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(n)}
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        one = statistics.median(float(v) for v in out.split()[-args.repeats :])
        os.environ.update(FRACCOMPILE_NUM_THREADS="1", OMP_NUM_THREADS="1")
        per_rank = launch(n, _worker, kind, args.batch // n, args.warmup, args.steps, args.repeats)
        many = statistics.median(max(blocks) for blocks in zip(*per_rank))
        label = "fp32" if kind == "fp32" else "tvm 8/8/8"
        for setup, sec in (
            (f"1 process x {n} threads", one),
            (f"{n} processes x 1 thread (DDP, gloo)", many),
        ):
            rows.append([label, setup, f"{1000 * sec:.1f}", f"{args.batch / sec:.1f}", f"{one / sec:.2f}x"])
    print_table(["model", "processes x threads", "ms / step (median)", "images / s", "vs 1 process"], rows)
    print()
    print(f"load average after: {_loadavg()}")


if __name__ == "__main__":
    main()
