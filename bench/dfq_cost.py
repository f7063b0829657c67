"""DFQ execution cost: dense (every candidate computed and masked, as FracTrain's public code does)
versus routed (each sample runs only at its chosen precision), ResNet-38 on CIFAR-shaped input
with FracTrain's 5 candidates (a in 3,4,4,6,6; g in 6,6,8,8,12), reference backend.

Each mode runs in its own process so that its peak resident memory is its own. Static 8/8/8 and the
original fp32 model are measured alongside for scale. One step = forward, loss, backward, update.

    python bench/dfq_cost.py [--batch 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from _common import header, median_ms, print_table

MODES = ("fp32", "static-8/8/8", "dfq-dense", "dfq-routed")


def measure(mode: str, batch: int, repeats: int) -> dict:
    import fraccompile
    from fraccompile.examples.resnet_cifar import resnet38

    torch.manual_seed(0)
    model = resnet38()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if mode == "fp32":
        net = model
    elif mode == "static-8/8/8":
        net = fraccompile.compile(model, x, a=8, w=8, g=8)
    else:
        net = fraccompile.compile(model, x, pipeline="dfq", gate_mode=mode.split("-")[1])
        with torch.no_grad():  # an untrained head picks one candidate: spread the choices
            net.frac_gates.head.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    ms = median_ms(step, repeats, warmup=1)
    out = {"mode": mode, "ms": ms, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if mode.startswith("dfq"):
        shares = torch.stack([net.frac_gates.fractions(r).detach() for r in net.frac_gates.last]).mean(0)
        out["shares"] = [round(s, 3) for s in shares.tolist()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.repeats)))
        return
    header("DFQ step cost: dense vs routed, ResNet-38, 5 candidates (reference backend)")
    results = {}
    for mode in MODES:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--batch",
                str(args.batch),
                "--repeats",
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    routed = results["dfq-routed"]["ms"]
    rows = [
        [m, f"{r['ms']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['ms'] / routed:.2f}x"]
        for m, r in results.items()
    ]
    print(f"ResNet-38, batch {args.batch}, median of {args.repeats} steps (1 warm-up), one process per mode")
    print_table(["mode", "ms / step", "peak RSS (MB)", "time vs routed"], rows)
    print(
        f"\ncandidate shares chosen (a/g = 3/6, 4/6, 4/8, 6/8, 6/12): {results['dfq-routed'].get('shares')}"
    )
    print(f"dense / routed step time: {results['dfq-dense']['ms'] / routed:.2f}x")


if __name__ == "__main__":
    main()
