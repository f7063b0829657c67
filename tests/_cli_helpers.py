"""Shared by the tests that run ``fraccompile train`` in-process: the command line of a short run
on the static 8/8/8 schedule."""

from __future__ import annotations


def options(**values) -> list[str]:
    """``--name value`` for each keyword, in order (``batch_size=8`` -> ``--batch-size 8``)."""
    out = []
    for name, value in values.items():
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


def static_train_args(model, *args: str, **values) -> list[str]:
    """``fraccompile train MODEL --schedule static --fw 8 --bw 8``, then ``args`` and the
    ``values`` as options (see :func:`options`)."""
    return ["train", str(model), "--schedule", "static", "--fw", "8", "--bw", "8", *args, *options(**values)]
