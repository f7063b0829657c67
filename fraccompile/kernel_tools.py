"""The library side of the kernel tools, ``fraccompile tune`` and ``fraccompile export`` (and of
``bench/tune.py``): a model compiled for the integer kernels with its example input, a tuning
database opened with its problems reported as :class:`~fraccompile.errors.ConfigError`, and the
cells that name a tuned GEMM in a table. The tools themselves are :mod:`fraccompile.targets.tools.tuning`
and :mod:`fraccompile.targets.tools.export`.

TVM is imported only when a function needs it (through :mod:`fraccompile.targets`), so importing
this module stays cheap and works where TVM is missing.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import ConfigError

TARGETS = ("cpu", "cuda")


def require_tvm() -> None:
    """Refuse, with the reason in one line, where TVM cannot be imported or cannot build."""
    from .targets import tvm_unavailable_reason

    reason = tvm_unavailable_reason()
    if reason:
        raise ConfigError(reason)


def kernel_model(model_spec: str, input_shape: str, config: Optional[os.PathLike], dtype: str, target: str):
    """``(fmodel, x)``: the model of ``model_spec`` (``PATH.py[:NAME]``) compiled for the tvm
    backend, on no kernel library and with no fallback (scheme symmetric unless the ``config``
    file says otherwise), and its example input of ``input_shape`` (e.g. ``"128,3,32,32"``)."""
    from .api import compile as frac_compile
    from .config import FracConfig
    from .loading import example_input, load_model, parse_shape

    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: choose cpu or cuda")
    cfg = FracConfig.load(config) if config is not None else FracConfig(scheme="symmetric")
    cfg = cfg.replace(backend="tvm", kernels="", kernels_fallback=False)
    model = load_model(model_spec)
    x = example_input(model, parse_shape(input_shape), dtype)
    return frac_compile(model, x, cfg), x


def open_tuning_db(directory: os.PathLike | str, rpc: Optional[str] = None):
    """The :class:`~fraccompile.targets.runtime.tuning_db.TuningDB` in ``directory`` (empty if there is
    none yet); with ``rpc``, its ``HOST:PORT:KEY`` is checked first. A malformed address or a
    database that cannot be read is a :class:`ConfigError`."""
    from .targets.runtime.tuning_db import TuningDB
    from .targets.tools.tuning import parse_rpc

    try:
        if rpc:
            parse_rpc(rpc)
        return TuningDB(directory)
    except ValueError as err:  # a malformed address, or TuningDBError
        raise ConfigError(str(err)) from None


def tuned_gemm_cells(record, sites: list[str]) -> list[str]:
    """A tuned GEMM's first cells in a table: its problem ``G,M,N,K``, the ``sites`` that run it
    (the first one and how many more), the default tile and the tuned one (``MBxNBxKB``).
    ``record`` is a :class:`~fraccompile.targets.runtime.tuning_db.TuneRecord`."""
    return [
        ",".join(map(str, record.problem)),
        sites[0] + (f" +{len(sites) - 1}" if len(sites) > 1 else ""),
        "x".join(map(str, record.default_tile)),
        "x".join(map(str, record.tile)),
    ]
