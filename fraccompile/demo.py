"""``fraccompile demo``: compile the bundled ResNet-20, train it briefly on the bundled CIFAR-10
subset, and show what the compiler did and what it saves."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from rich.console import Console

from .api import compile as frac_compile
from .config import FracConfig
from .data import batches, load_bundled_cifar10
from .examples.resnet_cifar import resnet20
from .report import sites_table


def _accuracy(model, images, labels, batch_size=250) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(images, labels, batch_size, shuffle=False):
            correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(labels)


def run_demo(steps: int = 80, batch_size: int = 64, config: FracConfig | None = None,
             lr: float = 0.05, seed: int = 0, console: Console | None = None) -> dict:
    console = console or Console()
    config = config or FracConfig(a=8, w=8, g=8)
    torch.manual_seed(seed)
    train_x, train_y = load_bundled_cifar10("train")
    test_x, test_y = load_bundled_cifar10("test")
    model = resnet20()
    example = torch.zeros(batch_size, 3, 32, 32)
    t0 = time.perf_counter()
    fmodel = frac_compile(copy.deepcopy(model), example, config)
    compile_s = time.perf_counter() - t0
    console.print(sites_table(fmodel, title=f"ResNet-20 compiled in {compile_s:.2f} s "
                                            f"(capture: torch.{fmodel.meta['frac_capture']})"))
    opt = torch.optim.SGD(fmodel.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    step, losses, t0 = 0, [], time.perf_counter()
    while step < steps:
        for x, y in batches(train_x, train_y, batch_size, seed=seed + step, augment=True,
                            drop_last=True):
            loss = F.cross_entropy(fmodel(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == steps:
                console.print(f"step {step:4d}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
            if step == steps:
                break
    train_s = time.perf_counter() - t0
    acc = _accuracy(fmodel, test_x, test_y)
    cost = fmodel.cost()
    console.print(f"trained {steps} steps (batch {batch_size}, a/w/g {config.a}/{config.w}/"
                  f"{config.g}) in {train_s:.1f} s ({1000 * train_s / steps:.0f} ms/step); "
                  f"test accuracy on the bundled 500-image split: {100 * acc:.1f}%")
    console.print(f"cost of one step: {cost.summary()}")
    console.print(f"saving against fp32 training: {100 * (1 - cost.cp):.1f}% of bit-operations")
    return {"losses": losses, "accuracy": acc, "cp": cost.cp, "compile_s": compile_s,
            "train_s": train_s}
