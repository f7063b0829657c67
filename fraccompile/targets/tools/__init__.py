"""Kernel tooling: ``tuning`` (the measured tile search behind ``fraccompile tune``, recorded in
:mod:`..runtime.tuning_db`) and ``export`` (a model's kernels into one library per target with a
manifest, ``fraccompile export``, served by :mod:`..runtime.exported`). Their callers are
:mod:`fraccompile.kernel_tools`, :mod:`fraccompile.cli_kernels` and ``bench/tune.py``.

Imports: any layer of ``fraccompile.targets`` (kernels, runtime, backend); no other layer imports
the tools.
"""
