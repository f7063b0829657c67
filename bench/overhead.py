"""Training-step time: original fp32 model vs the compiled model (reference backend).

The reference backend computes in fp32 on fake-quantized values, so this measures the cost of the
quantizers and precision plumbing that fraccompile adds (the TVM backend is what makes steps
cheaper). One step = forward, loss, backward, SGD update.

    python bench/overhead.py [--repeats 10] [--bits 8]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import header, median_ms, print_table

import fraccompile
from fraccompile.examples.resnet_cifar import resnet20
from fraccompile.examples.transformer_lm import TransformerLM


def step_fn(model, x, y, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args()
    header("Training-step overhead of the compiled model (reference backend)")
    torch.manual_seed(0)
    lm = TransformerLM(vocab_size=65, block_size=64, d_model=128, n_heads=4, n_layers=2)
    cases = [
        (
            "ResNet-20, batch 128, 3x32x32",
            resnet20(),
            torch.randn(128, 3, 32, 32),
            torch.randint(0, 10, (128,)),
            F.cross_entropy,
        ),
        (
            "Transformer (d128, 2 layers), batch 16 x 64 tokens",
            lm,
            torch.randint(0, 65, (16, 64)),
            torch.randint(0, 65, (16, 64)),
            lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()),
        ),
    ]
    rows = []
    b = args.bits
    for name, model, x, y, loss_fn in cases:
        fp = median_ms(step_fn(copy.deepcopy(model), x, y, loss_fn), args.repeats)
        fm = fraccompile.compile(copy.deepcopy(model), x, a=b, w=b, g=b)
        q = median_ms(step_fn(fm, x, y, loss_fn), args.repeats)
        fm0 = fraccompile.compile(copy.deepcopy(model), x, a=0, w=0, g=0)
        q0 = median_ms(step_fn(fm0, x, y, loss_fn), args.repeats)
        rows.append([name, f"{fp:.1f}", f"{q0:.1f}", f"{q:.1f}", f"{q / fp:.2f}x"])
    print(f"median ms per training step over {args.repeats} steps (after 2 warm-up steps)")
    print_table(
        ["model", "original fp32", "compiled, precision 0", f"compiled {b}/{b}/{b} (reference)", "overhead"],
        rows,
    )


if __name__ == "__main__":
    main()
