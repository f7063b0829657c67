"""Loss and gradient fidelity of quantized training on real CIFAR-10 data.

Trains ResNet-20 in fp32 for a few steps on the bundled CIFAR-10 subset (so the loss is off its
initial plateau), then compares one training-mode forward/backward on a held-out real batch: fp32
versus the compiled model at several (a, w, g) and both schemes. Prints relative loss difference and
the cosine similarity of the full parameter gradient.

    python bench/fidelity.py [--steps 30] [--batch 256]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import header, print_table

import fraccompile
from fraccompile.data import batches, load_bundled_cifar10, normalize
from fraccompile.examples.resnet_cifar import resnet20


def pretrained_resnet20(steps: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet20()
    images, labels = load_bundled_cifar10("train")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    done = 0
    while done < steps:
        for x, y in batches(images, labels, 64, seed=seed + done, augment=True, drop_last=True):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model


def loss_and_grad(model, x, y, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    return loss.item(), grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    header("Quantized-training fidelity, ResNet-20 on a real CIFAR-10 batch")
    model = pretrained_resnet20(args.steps)
    images, labels = load_bundled_cifar10("test")
    x, y = normalize(images[: args.batch]), labels[: args.batch]
    ref_loss, ref_grad = loss_and_grad(copy.deepcopy(model), x, y)
    rows = [["fp32", "-", f"{ref_loss:.4f}", "0.00%", "1.0000"]]
    for a, w, g in [(8, 8, 8), (6, 6, 8), (4, 4, 8), (3, 3, 6)]:
        for scheme in ("sbm", "symmetric"):
            fm = fraccompile.compile(copy.deepcopy(model), x, a=a, w=w, g=g, scheme=scheme)
            loss, grad = loss_and_grad(fm, x, y)
            cos = F.cosine_similarity(grad, ref_grad, dim=0).item()
            rows.append(
                [
                    f"{a}/{w}/{g}",
                    scheme,
                    f"{loss:.4f}",
                    f"{100 * abs(loss - ref_loss) / ref_loss:.2f}%",
                    f"{cos:.4f}",
                ]
            )
    print(
        f"ResNet-20 after {args.steps} fp32 SGD steps on the bundled subset; "
        f"batch of {args.batch} bundled test images, train mode"
    )
    print_table(["a/w/g", "scheme", "loss", "|Δloss|/loss", "grad cosine vs fp32"], rows)


if __name__ == "__main__":
    main()
