"""``fraccompile demo``: compile the bundled ResNet-20, train it briefly with FracTrain's PFQ on the
bundled CIFAR-10 subset, and show the rewritten layers, the precision switches and the saving."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console

from .api import compile as frac_compile
from .config import FracConfig
from .control import PFQ
from .data import ClassificationData
from .examples.resnet_cifar import resnet20
from .meta_keys import GM_CAPTURE
from .ops.backend import resolve_auto
from .report import sites_table
from .train import fit


def run_demo(
    iters: int = 90,
    batch_size: int = 64,
    config: FracConfig | None = None,
    schedule=None,
    lr: float = 0.05,
    seed: int = 0,
    out_dir=None,
    console: Console | None = None,
) -> dict:
    """PFQ by default with FracTrain's public-code indicator settings (threshold 0.15, decay 0.4)
    over short periods, so the switches show within a short run."""
    console = console or Console()
    config = config or FracConfig(backend="auto")
    schedule = schedule or PFQ((3, 4, 6, 8), (6, 6, 8, 8), eval_every=3, eps=0.15, alpha=0.4)
    data = ClassificationData.from_source("bundled", batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = resnet20()
    fp32 = copy.deepcopy(model)  # the baseline of the step-time line below
    fmodel = frac_compile(model, torch.zeros(batch_size, 3, 32, 32), config)
    console.print(
        sites_table(
            fmodel,
            title=f"ResNet-20 compiled in {time.perf_counter() - t0:.2f} s"
            f" (capture: torch.{fmodel.meta[GM_CAPTURE]})",
        )
    )
    console.print(
        f"training {iters} iterations on the bundled CIFAR-10 subset "
        f"({len(data.train_labels)} train / {len(data.test_labels)} test images): "
        f"{schedule.describe()}"
    )
    result = fit(
        fmodel,
        data,
        iters=iters,
        schedule=schedule,
        lr=lr,
        eval_every=max(iters // 3, 1),
        out_dir=out_dir,
        seed=seed,
        console=console,
        model_name="ResNet-20",
    )
    meter = fmodel.frac_meter
    switches = [(e["iter"], e["precision"]) for e in result.events if e.get("event") == "turning_point"]
    for it, p in switches:
        console.print(f"precision switch at iteration {it}: a/w/g -> {p['a']}/{p['w']}/{p['g']}")
    if not switches:
        console.print("no precision switch fired (the loss had not plateaued)")
    saving_fp32 = 1 - meter.total / meter.fp32
    saving_sbm = 1 - meter.total / meter.sbm
    console.print(
        f"bit-cost of the run: {meter.total / meter.fp32:.2%} of fp32 training "
        f"({saving_fp32:.1%} saved), {saving_sbm:.1%} saved against static 8/8/8 (SBM); "
        f"final test accuracy {100 * (result.final.get('test_acc') or 0):.1f}% "
        f"on the {len(data.test_labels)} bundled test images"
    )
    times = step_times(fmodel, fp32, data, batch_size)
    sites = [s for s in fmodel.sites if not s.full_precision]
    on_int = sum(s.backend != "reference" for s in sites)
    backend = fmodel.frac_config.backend
    if backend == "auto":
        backend = f"auto: {resolve_auto()}"
    console.print(
        f"step time (forward + backward, batch {batch_size}, median of "
        f"{STEP_ROUNDS} interleaved): {times['fraccompile']:.1f} ms compiled "
        f"({on_int} of {len(sites)} quantized sites on integer kernels, backend "
        f"{backend}) against {times['fp32']:.1f} ms for fp32 "
        f"channels-last: {times['fraccompile'] / times['fp32']:.2f}x"
    )
    return {
        "switches": switches,
        "saving_fp32": saving_fp32,
        "saving_sbm": saving_sbm,
        "final": result.final,
        "periods": result.periods,
        "step_ms": times,
    }


STEP_ROUNDS = 5


def step_times(fmodel, fp32: torch.nn.Module, data, batch_size: int) -> dict[str, float]:
    """Median ms of a training step's forward and backward (no optimizer) of ``fmodel`` and of
    the fp32 model in channels-last (the strongest plain CPU baseline), interleaved round by
    round on one batch (after one warm-up step each)."""
    fp32 = fp32.to(memory_format=torch.channels_last).train()
    x, y = next(iter(data.batches(0)))
    runs = {"fraccompile": (fmodel, x), "fp32": (fp32, x.contiguous(memory_format=torch.channels_last))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(STEP_ROUNDS + 1):
        for name, (m, inp) in runs.items():
            t0 = time.perf_counter()
            F.cross_entropy(m(inp), y).backward()
            if r:
                times[name].append(1000 * (time.perf_counter() - t0))
            m.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}
