"""Training-step time and memory: the original fp32 model vs the compiled model (a=w=g=8,
symmetric) on the reference and the TVM backend.

One step = zero_grad, forward, cross-entropy loss (the Transformer: next-token), backward, SGD
update. Each (model, mode) runs in a fresh child process (``sys.executable``), which reports:

* step ms: the median over ``--repeats`` steps after 2 warm-up steps (the TVM kernels are built
  or loaded from the on-disk cache in the first one);
* peak RSS: ``ru_maxrss`` of the child at the end (imports, model, warm-up and timed steps);
* page faults per step (in the notes under the table): the child's minor faults (``ru_minflt``)
  over the timed steps, per step: pages the kernel mapped in on first touch;
* saved for backward: the bytes of the distinct storages autograd saves during one forward (and
  the loss), parameters excluded (``torch.autograd.graph.saved_tensors_hooks``).

    python bench/step.py [--repeats 5] [--models resnet20,transformer] [--tuning-db DIR]

ResNet-20 also gets an ``fp32-cl`` row: the fp32 model and its input in ``torch.channels_last``
(PyTorch's advice for convnets on CPU; oneDNN's fp32 convs are much faster that way here), the
stronger baseline. ``--pairs N`` then runs N more fp32/tvm child pairs per model (fp32, fp32-cl,
tvm for ResNet-20), alternately, and prints the spread of the tvm/fp32 ratios (the step times move
by ±10% between runs on a shared machine).
``--tuning-db DIR`` adds a ``tvm-tuned`` row per model: the TVM backend with the tiles of a
``fraccompile tune`` database (``FracConfig(tuning_db=DIR)``). ``--env KEY=VALUE`` (repeatable)
sets an environment variable in every child, e.g. ``OMP_WAIT_POLICY=PASSIVE`` (torch's OpenMP
threads sleep instead of spinning between ops) or ``TVM_THREAD_POOL_SPIN_COUNT=300000`` (TVM's
default spinning, which fraccompile turns off unless the variable is set) or
``FRACCOMPILE_THREADS=tvm`` (the kernels' parallel loops on TVM's thread pool instead of torch's
OpenMP threads, see ``fraccompile/targets/runtime/threads.py``), ``FRACCOMPILE_MALLOC=system`` (glibc's
default thresholds in the tvm children too, see ``fraccompile/targets/runtime/memory.py``) or
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` (glibc keeps freed memory in
every child, fp32 ones included: the like-for-like comparison, since a tvm child sets that
itself). ``--weight-scale tensor`` compiles the reference and tvm rows with
``FracConfig(weight_scale="tensor")`` (one weight range per tensor: the tvm backend's linear
error backprop becomes an integer GEMM), and
``--rounding-noise torch|counter`` sets ``FracConfig.rounding_noise`` (default ``counter``, the
library's: stochastic rounding's noise from a counter-based hash, which the tvm backend computes
inside its quantize kernel; ``torch`` draws ``torch.rand``). ``--recompute
none|activations|norms`` sets ``FracConfig.recompute`` (what the tvm backend's backward
recomputes from int8 codes instead of keeping fp32; default ``activations``), and
``--recompute-budget F`` (with ``activations`` or ``norms``) ``FracConfig.recompute_budget``: the
fraction of what those recomputes would free that backward keeps instead of recomputing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("fp32", "reference", "tvm")
# the fp32 model channels-last too, where the model is a convnet (oneDNN's fp32 convs are much
# faster channels-last on these cores: the stronger fp32 baseline)
CL_MODES = {"resnet20": ["fp32-cl"]}
MODELS = {
    "resnet20": "ResNet-20, batch 128, 3x32x32",
    "transformer": "Transformer d512 (2 layers), batch 32 x 64 tokens",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the child: one configuration ------------------------------------------------------------------
def make_case(key: str):
    import torch
    import torch.nn.functional as F

    from fraccompile.examples import resnet_cifar, transformer_lm

    torch.manual_seed(0)
    if key == "resnet20":
        return (
            resnet_cifar.resnet20(),
            torch.randn(128, 3, 32, 32),
            torch.randint(0, 10, (128,)),
            F.cross_entropy,
        )
    tokens = torch.randint(0, 65, (32, 65))
    return (
        transformer_lm.model_d512(),
        tokens[:, :-1],
        tokens[:, 1:],
        lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
    )


def saved_bytes(model, x, y, loss_fn) -> int:
    """Bytes of the distinct storages autograd saves in one forward + loss, parameters excluded."""
    from _common import saved_bytes as count

    total = count(lambda: loss_fn(model(x), y), model.parameters())
    model.zero_grad(set_to_none=True)  # the gradients are not used
    return total


def child(key: str, mode: str, repeats: int, fields: dict | None = None) -> dict:
    """One (model, mode) row, in this process; ``fields``: FracConfig fields of compiled rows."""
    mode, _, tuning_db = mode.partition(":")
    if mode in ("tvm", "tvm-tuned", "import-tvm"):  # sets TVM_NUM_THREADS, imports tvm first
        import fraccompile.targets.backend  # noqa: F401
    if mode.startswith("import"):  # the baseline: what the imports alone cost
        import torch  # noqa: F401

        import fraccompile  # noqa: F401
        from fraccompile.examples import resnet_cifar, transformer_lm  # noqa: F401

        return {"rss_mb": peak_rss_mb()}
    import torch

    import fraccompile
    from fraccompile.ops.modules import FracOp
    from fraccompile.targets.runtime import memory, threads

    model, x, y, loss_fn = make_case(key)
    info: dict = {}
    if mode == "fp32-cl":  # PyTorch's advice for convnets on CPU: model and input channels-last
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif mode != "fp32":
        cfg = fraccompile.FracConfig(
            a=8,
            w=8,
            g=8,
            scheme="symmetric",
            backend="tvm" if mode == "tvm-tuned" else mode,
            tuning_db=tuning_db,
            **(fields or {}),
        )
        model = fraccompile.compile(model, x, config=cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    warm = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        warm.append(1000 * (time.perf_counter() - t0))
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    info.update(
        step_ms=statistics.median(times),
        warmup_ms=warm,
        saved_mb=saved_bytes(model, x, y, loss_fn) / 2**20,
        faults_per_step=faults / repeats,
    )
    if not mode.startswith("fp32"):
        sites = model.sites
        info["sites"] = {
            "tvm": sum(s.backend == "tvm" for s in sites),
            "reference": sum(not s.full_precision and s.backend != "tvm" for s in sites),
            "fp32": sum(s.full_precision for s in sites),
            "reasons": sorted({s.fallback_reason for s in sites if s.fallback_reason}),
        }
        caches = {
            id(b.cache): b.cache
            for m in model.modules()
            if isinstance(m, FracOp)
            for b in [m.backend]
            if hasattr(b, "cache") and mode.startswith("tvm")
        }
        if caches:
            st = [c.stats for c in caches.values()]
            info["kernels"] = {
                "built": sum(s.built for s in st),
                "build_s": sum(sum(s.build_seconds) for s in st),
                "loaded": sum(s.loaded - s.built for s in st),
                "pool": threads.pool(),
            }
    info["freed_memory"] = memory.policy()
    info["rss_mb"] = peak_rss_mb()
    return info


def run_child(key: str, mode: str, repeats: int, env: dict | None = None, fields: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key, mode, "--repeats", str(repeats)]
    for name, value in (fields or {}).items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return {"error": f"child exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the parent: the table -------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument("--tuning-db", default="", help="also run tvm with this tuning database")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for every child (repeatable)",
    )
    parser.add_argument(
        "--weight-scale",
        choices=("channel", "tensor"),
        default="channel",
        help="FracConfig.weight_scale of the compiled rows",
    )
    parser.add_argument(
        "--rounding-noise",
        choices=("torch", "counter"),
        default="counter",
        help="FracConfig.rounding_noise of the compiled rows",
    )
    parser.add_argument(
        "--recompute",
        choices=("none", "activations", "norms"),
        default="activations",
        help="FracConfig.recompute of the compiled rows",
    )
    parser.add_argument(
        "--recompute-budget",
        type=float,
        default=0.0,
        help="FracConfig.recompute_budget of the compiled rows (with activations or norms)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="then N more fp32/tvm child pairs per model, run alternately, for "
        "the spread of the tvm/fp32 ratio between runs",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    fields = {
        "weight_scale": args.weight_scale,
        "rounding_noise": args.rounding_noise,
        "recompute": args.recompute,
        "recompute_budget": args.recompute_budget,
    }
    if args.child:
        print(json.dumps(child(*args.child, args.repeats, fields)))
        return
    env = {}
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in keys:
        if k not in MODELS:
            parser.error(f"unknown model {k!r}; choose from {', '.join(MODELS)}")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import header, print_table

    header("Training step: time and memory, fp32 vs compiled a=w=g=8 symmetric (reference and TVM backends)")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"environment of every child: {' '.join(args.env) or '(as inherited)'}; "
        f"weight_scale {args.weight_scale}, rounding_noise {args.rounding_noise}, "
        f"recompute {args.recompute}"
        + (f", recompute_budget {args.recompute_budget:g}" if args.recompute_budget else "")
    )
    base = {m: run_child("-", m, 0, env).get("rss_mb") for m in ("import", "import-tvm")}
    rows, notes = [], []
    modes = list(MODES) + ([f"tvm-tuned:{os.path.abspath(args.tuning_db)}"] if args.tuning_db else [])
    for key in keys:
        res = {
            mode.partition(":")[0]: run_child(key, mode, args.repeats, env, fields)
            for mode in modes[:1] + CL_MODES.get(key, []) + modes[1:]
        }
        fp = res["fp32"]
        for mode in res:
            r = res[mode]
            if "error" in r:
                rows.append([MODELS[key], mode, r["error"], "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    MODELS[key],
                    mode,
                    f"{r['step_ms']:.1f}",
                    f"{r['step_ms'] / fp['step_ms']:.2f}x" if "step_ms" in fp else "-",
                    f"{r['rss_mb']:.0f}",
                    f"{r['saved_mb']:.1f}",
                    f"{r['saved_mb'] / fp['saved_mb']:.2f}x" if "saved_mb" in fp else "-",
                ]
            )
            warm = ", ".join(f"{w:.0f}" for w in r["warmup_ms"])
            note = f"{MODELS[key]}, {mode}: warm-up steps {warm} ms"
            if "sites" in r:
                s = r["sites"]
                ref = "fallback to reference" if mode.startswith("tvm") else "on reference"
                note += (
                    f"; sites: {s['tvm']} on tvm, {s['reference']} {ref}, "
                    f"{s['fp32']} kept fp32 (full_precision)"
                )
                if s["reasons"]:
                    note += f" ({'; '.join(s['reasons'])})"
            if "kernels" in r:
                k = r["kernels"]
                note += (
                    f"; kernels: {k['built']} built ({k['build_s']:.1f} s), "
                    f"{k['loaded']} loaded from the disk cache; parallel loops on "
                    f"{k['pool']}"
                )
            note += f"; page faults per step {r['faults_per_step']:.0f}; freed memory: {r['freed_memory']}"
            notes.append(note)
    print(
        f"median ms per step over {args.repeats} steps (after 2 warm-up steps); each row in a fresh process"
    )
    print_table(
        ["model", "mode", "step ms", "vs fp32", "peak RSS MB", "saved-for-backward MB", "vs fp32"], rows
    )
    print()
    if base["import"] and base["import-tvm"]:
        print(
            f"peak RSS of a child that only imports torch and fraccompile: {base['import']:.0f} "
            f"MB, and TVM too (as the tvm rows do): {base['import-tvm']:.0f} MB"
        )
    for n in notes:
        print(f"- {n}")
    if args.pairs:
        print()
        print(
            f"tvm/fp32 step-time ratio over {args.pairs} more fp32, tvm child pairs per model "
            "(with fp32-cl too where there is one), run alternately (each the median of its "
            "steps, as above)"
        )
        spread = []
        for key in keys:
            bases = ["fp32"] + CL_MODES.get(key, [])
            ratios: dict[str, list[float]] = {b: [] for b in bases}
            for _ in range(args.pairs):
                runs = {m: run_child(key, m, args.repeats, env, fields) for m in bases + ["tvm"]}
                for b in bases:
                    if "step_ms" in runs[b] and "step_ms" in runs["tvm"]:
                        ratios[b].append(runs["tvm"]["step_ms"] / runs[b]["step_ms"])
            for b, rs in ratios.items():
                if rs:
                    spread.append(
                        [
                            MODELS[key],
                            f"tvm / {b}",
                            " ".join(f"{r:.2f}" for r in rs),
                            f"{statistics.median(rs):.2f}x",
                            f"{min(rs):.2f}-{max(rs):.2f}x",
                        ]
                    )
        print_table(["model", "ratio", "ratios, in run order", "median", "range"], spread)


if __name__ == "__main__":
    main()
