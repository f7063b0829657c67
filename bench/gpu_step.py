"""Training-step time and kernel launches per step on an NVIDIA GPU: the Transformer example
(d_model 512, 64 tokens) and ResNet-20 (CIFAR-shaped random input), each in fp32, bf16 autocast and
fraccompile's backends at 8/8/8, with and without CUDA graphs.

    python bench/gpu_step.py [--models transformer,resnet20] [--batch 128] [--repeats 10]
                             [--budget SECONDS] [--profile] [--dry-run]

Modes (``--dry-run`` lists them per model and exits, on any machine):

* ``fp32`` / ``bf16 autocast``: the plain model, eager (ResNet-20 also fp32 channels-last; its bf16
  runs channels-last); ``+ graphs``: the same through ``torch.cuda.make_graphed_callables``
  (forward and backward graphed; bf16 with ``cache_enabled=False``, which graphs need);
* ``fraccompile reference 8/8/8``: fake quantization in fp32 on the GPU;
* ``fraccompile tvm 8/8/8`` (``symmetric``: int8 codes on the TVM integer GEMMs); ``+ cuda_graphs``:
  compiled with ``FracConfig(cuda_graphs=True)``. A capture that fails (a host sync left in the
  step) prints the reason in its row and the run goes on.

One step = forward, cross-entropy, backward, SGD update. Columns: the CUDA-event median over
``--repeats`` steps after 3 warm-up steps (kernel builds and graph captures happen there); the
speed relative to bf16 autocast and to fp32 (their time over the row's); and per step, from a
torch.profiler run of 2 more steps: ``GPU kernels`` (kernels that ran on the GPU: the profiler's
CUDA-device kernel events, graph replays included, memcpy/memset not), ``launch calls`` (host calls
that launch work: the profiler's cudaLaunchKernel*/cuLaunchKernel*/cudaGraphLaunch events; a graph
replay is one call, a graphed step has two: forward and backward) and ``fc launches``
(cuLaunchKernel calls through fraccompile's own driver, counted in Python: they are in ``launch
calls`` only where the profiler records driver calls).

``--budget``: seconds after which the remaining modes are ``skipped (time budget)``; a line per
mode is printed as it finishes (so a run cut short keeps them), the tables at the end. The
fraccompile ``+ cuda_graphs`` modes run in a child process each (a failed capture may leave its
process's CUDA state unusable), after the tvm mode has built the kernels. ``--profile`` adds
torch.profiler's table of the tvm mode's steps by self CPU time. Prints "no GPU: skipped" and
exits 0 without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, print_table  # noqa: E402

import fraccompile  # noqa: E402

MODELS = ("transformer", "resnet20")
LAUNCH_APIS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cudaLaunchCooperativeKernel",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
    "cuGraphLaunch",
)
RESULT = "RESULT "  # how a --child process prints its result
COLUMNS = ("mode", "step ms", "vs bf16", "vs fp32", "GPU kernels", "launch calls", "fc launches")


@dataclass(frozen=True)
class Mode:
    name: str
    kind: str  # "plain" (the torch model) or a fraccompile backend
    autocast: bool = False
    channels_last: bool = False
    graphs: bool = False


def modes_for(model: str) -> list[Mode]:
    """What each model is timed in, in order (the fp32 and bf16 rows first: the others are
    compared with them)."""
    cl = model == "resnet20"
    out = [Mode("fp32 eager", "plain")]
    if cl:
        out.append(Mode("fp32 channels-last", "plain", channels_last=True))
    out += [
        Mode("fp32" + (" channels-last" if cl else "") + " + graphs", "plain", channels_last=cl, graphs=True),
        Mode("bf16 autocast" + (" channels-last" if cl else ""), "plain", autocast=True, channels_last=cl),
        Mode("bf16 autocast + graphs", "plain", autocast=True, channels_last=cl, graphs=True),
        Mode("fraccompile reference 8/8/8", "reference"),
        Mode("fraccompile tvm 8/8/8", "tvm"),
        Mode("fraccompile tvm 8/8/8 + cuda_graphs", "tvm", graphs=True),
    ]
    return out


# -- counting ---------------------------------------------------------------------------------------
def _on_gpu(event) -> bool:
    return str(getattr(event, "device_type", "")).rsplit(".", 1)[-1] == "CUDA"


def count_launches(events: Iterable, steps: int) -> tuple[float, float]:
    """``(GPU kernels, host launch calls)`` per step among profiler ``events`` (objects with
    ``name`` and ``device_type``) of ``steps`` steps."""
    kernels = calls = 0
    for e in events:
        if _on_gpu(e):
            if not e.name.startswith(("Memcpy", "Memset")):
                kernels += 1
        elif e.name in LAUNCH_APIS:
            calls += 1
    return kernels / steps, calls / steps


class DriverLaunches:
    """Counts cuLaunchKernel calls through fraccompile's CUDA driver wrapper while active."""

    def __init__(self) -> None:
        self.count: int | None = None

    def __enter__(self) -> DriverLaunches:
        from fraccompile.targets.runtime import cuda_driver

        cls = getattr(cuda_driver, "_Driver", None)
        if cls is None or "__call__" not in vars(cls):
            return self  # (the wrapper changed: n/a)
        self._cls, self._orig, self.count = cls, cls.__call__, 0

        def counting(drv, name, *args):
            if str(name).startswith("cuLaunchKernel"):
                self.count += 1
            return self._orig(drv, name, *args)

        cls.__call__ = counting
        return self

    def __exit__(self, *exc) -> None:
        if self.count is not None:
            self._cls.__call__ = self._orig


# -- one mode -----------------------------------------------------------------------------------------
def _inputs(model: str, batch: int, block: int):
    g = torch.Generator().manual_seed(0)
    if model == "transformer":
        tokens = torch.randint(0, 65, (batch, block + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _base(model: str):
    torch.manual_seed(0)
    if model == "transformer":
        from fraccompile.examples import transformer_lm

        return transformer_lm.model_d512()
    from fraccompile.examples.resnet_cifar import resnet20

    return resnet20()


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2) if y.dim() > 1 else logits.float(), y.flatten())


def build(mode: Mode, base, x_cpu: torch.Tensor):
    """``(module, x on the GPU)`` for ``mode``; raises what compiling or capturing raises."""
    fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
    if mode.kind == "plain":
        model = copy.deepcopy(base).cuda().to(memory_format=fmt)
        x = x_cpu.cuda().contiguous(memory_format=fmt) if x_cpu.dim() == 4 else x_cpu.cuda()
        if mode.graphs:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.autocast, cache_enabled=False):
                model = torch.cuda.make_graphed_callables(model, (x.clone(),))
        return model, x
    cfg = fraccompile.FracConfig(
        a=8, w=8, g=8, scheme="symmetric", backend=mode.kind, cuda_graphs=mode.graphs
    )
    # compiled on the CPU, then moved (the sites' range buffers move with the module)
    fm = fraccompile.compile(copy.deepcopy(base), x_cpu, cfg).cuda()
    x = x_cpu.cuda()
    if x.dim() == 4:
        x = x.contiguous(memory_format=fm.fp32_memory_format)
    return fm, x


def make_step(model, x, y, mode: Mode) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=mode.autocast, cache_enabled=not mode.graphs
        ):
            loss = _loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_ms(step: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_launches(step: Callable[[], None], steps: int = 2, table: bool = False):
    """``(GPU kernels, launch calls, fraccompile driver launches)`` per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with DriverLaunches() as drv, profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels, calls = count_launches(prof.events(), steps)
    if table:
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        )
    return kernels, calls, None if drv.count is None else drv.count / steps


def header() -> None:
    """The title, the command, the machine (the GPU) and the host, as bench/gpu_kernels.py prints
    them."""
    props = torch.cuda.get_device_properties(0)
    print("# Training step on the GPU: fp32, bf16 autocast and fraccompile, with and without CUDA graphs")
    print(f"command: {' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}")
    print(
        f"machine: {props.name} (compute capability {props.major}.{props.minor}, "
        f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    )
    print(f"host: {machine()}")


# -- the table ----------------------------------------------------------------------------------------
def _ratio(ref: float | None, ms: float | None) -> str:
    return f"{ref / ms:.2f}x" if ref and ms else "n/a"


def measure(name: str, mode: Mode, args, inputs) -> dict:
    """One mode of one model: ``{"ms", "counts", "note"}`` (``ms`` None when it failed)."""
    x_cpu, y_cpu, base = inputs
    out: dict = {"ms": None, "counts": ["", "", ""], "note": ""}
    try:
        model, x = build(mode, base, x_cpu)
        step = make_step(model, x, y_cpu.cuda(), mode)
        out["ms"] = time_ms(step, args.repeats)
    except Exception as err:  # noqa: BLE001 - one failed mode must not end the run
        out["note"] = (
            f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        return out
    try:
        table = args.profile and mode.kind == "tvm" and not mode.graphs
        kernels, calls, fc = profile_launches(step, table=table)
        out["counts"] = [f"{kernels:.0f}", f"{calls:.0f}", "n/a" if fc is None else f"{fc:.0f}"]
    except Exception as err:  # noqa: BLE001
        out["note"] = f"profiler failed: {type(err).__name__}: {err}"
    if mode.kind == "tvm":
        notes = [f"{sum(s.backend == 'tvm' for s in model.sites)} of {len(model.sites)} sites on tvm"]
        if model.cuda_graphs is not None:
            notes.append(repr(model.cuda_graphs))
        out["note"] = "; ".join([*notes, out["note"]]).rstrip("; ")
    del model, step
    torch.cuda.empty_cache()
    return out


def measure_in_child(name: str, mode: Mode, args, deadline: float) -> dict:
    """:func:`measure` in a new process (``--child``): a capture that fails may leave its
    process's CUDA state unusable, and the rows after it must not pay for that. The kernels the
    parent built are on disk by then, so the child builds nothing new."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{mode.name}"]
    cmd += ["--batch", str(args.batch), "--block", str(args.block), "--repeats", str(args.repeats)]
    left = deadline - time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=None if left == float("inf") else left
        )
    except subprocess.TimeoutExpired:
        return {"ms": None, "counts": ["", "", ""], "note": "stopped (time budget)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ms": None, "counts": ["", "", ""], "note": f"failed (exit {proc.returncode}): {tail}"}


def run(models: list[str], args) -> dict[str, list[tuple[Mode, dict]]]:
    """Every mode of every model, in order; fraccompile's cuda_graphs modes in a child process
    (:func:`measure_in_child`). Prints a line per mode as it finishes."""
    deadline = time.monotonic() + (args.budget or float("inf"))
    results: dict[str, list[tuple[Mode, dict]]] = {n: [] for n in models}
    for name in models:
        inputs = (*_inputs(name, args.batch, args.block), _base(name))
        for mode in modes_for(name):
            if time.monotonic() > deadline:
                res = {"ms": None, "counts": ["", "", ""], "note": "skipped (time budget)"}
            elif mode.graphs and mode.kind != "plain":
                res = measure_in_child(name, mode, args, deadline)
            else:
                res = measure(name, mode, args, inputs)
            ms = "-" if res["ms"] is None else f"{res['ms']:.2f} ms"
            print(
                f"  {name} / {mode.name}: {ms} {' '.join(res['counts'])} {res['note']}".rstrip(), flush=True
            )
            results[name].append((mode, res))
    return results


def print_results(results: dict[str, list[tuple[Mode, dict]]], args) -> None:
    for name, rows in results.items():
        order = {m.name: i for i, m in enumerate(modes_for(name))}
        rows = sorted(rows, key=lambda r: order[r[0].name])
        fp32 = next((r["ms"] for m, r in rows if m.name == "fp32 eager"), None)
        bf16 = next((r["ms"] for m, r in rows if m.autocast and not m.graphs), None)
        shape = (
            f"{args.batch} x {args.block} tokens" if name == "transformer" else f"{args.batch} x 3 x 32 x 32"
        )
        print(
            f"\n{name}, batch {shape}: median of {args.repeats} steps; launches per step of 2 profiled steps"
        )
        table = []
        for mode, r in rows:
            ms = r["ms"]
            table.append(
                [
                    mode.name,
                    "-" if ms is None else f"{ms:.2f}",
                    _ratio(bf16, ms),
                    _ratio(fp32, ms),
                    *r["counts"],
                ]
            )
        print_table(list(COLUMNS), table)
        for mode, r in rows:
            if r["note"]:
                print(f"* {mode.name}: {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: transformer, resnet20")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--block", type=int, default=64, help="the Transformer's tokens per sample")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds; 0 = no limit")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's table of the tvm mode")
    parser.add_argument("--dry-run", action="store_true", help="list the modes and exit (no GPU needed)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # MODEL:MODE, see measure_in_child
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    if args.child:  # (measure_in_child): one mode, its result as one JSON line
        name, _, mode_name = args.child.partition(":")
        mode = next(m for m in modes_for(name) if m.name == mode_name)
        print(
            RESULT
            + json.dumps(measure(name, mode, args, (*_inputs(name, args.batch, args.block), _base(name))))
        )
        return 0
    if args.dry_run:
        for name in models:
            print(f"{name}: " + "; ".join(m.name for m in modes_for(name)))
        return 0
    from fraccompile.targets.runtime.cuda_driver import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        print(f"no GPU: skipped ({reason})")
        return 0
    header()
    print_results(run(models, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
