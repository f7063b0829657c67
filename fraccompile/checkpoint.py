"""Checkpoints: what ``fit`` saves after every period and resumes from.

A checkpoint is a dict of tensors and plain data (dict, list, tuple, str, int, float, bool, None)
written by :func:`save_checkpoint` with a sha256 of its content under ``"checksum"``, atomically
(an interrupted write leaves the previous checkpoint intact). :func:`load_checkpoint` loads it with
``torch.load(weights_only=True)``, so loading runs no code, checks the checksum and refuses a
damaged or foreign file with a :class:`CheckpointError` naming the problem.

Keys (version 2): ``iteration``, ``wall``, ``model``, ``optimizer``, ``lr_scheduler``,
``precision``, ``schedule``, ``meter``, ``rng`` (this process's generators, see
:func:`rng_state`), ``config``, ``skipped_steps``; a distributed run adds ``world_size``,
``parallel`` (``"ddp"`` or ``"fsdp"``) and ``rng_ranks`` (every process's generators, by rank).
A checkpoint without ``world_size`` was written by one process.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fileio
from .errors import FracCompileError

CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = (
    "iteration",
    "wall",
    "model",
    "optimizer",
    "lr_scheduler",
    "precision",
    "schedule",
    "meter",
    "rng",
)


class CheckpointError(FracCompileError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (tensors and plain data: dict, list, tuple, str, int, float, bool, None)
    with a sha256 of its content under ``"checksum"``, atomically: an interrupted write leaves the
    previous checkpoint intact (:func:`fraccompile.fileio.atomic_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "checksum": state_checksum(state)}
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return path


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 of ``state`` without its ``"checksum"`` key: every key, plain value, and tensor's
    dtype, shape and bytes, in order. ``TypeError`` for anything else (loading it would need code
    to run)."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h, "state")
    return h.hexdigest()


def _digest(obj, h, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _digest(key, h, where)
            _digest(value, h, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for i, value in enumerate(obj):
            _digest(value, h, f"{where}[{i}]")
    elif obj is None or type(obj) in (bool, int, float, str, bytes, torch.dtype, torch.device):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(
            f"checkpoint value {where} is a {type(obj).__module__}."
            f"{type(obj).__qualname__}: a checkpoint holds tensors and plain data "
            "only (dict, list, tuple, str, int, float, bool, None)"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path``, loaded with
    ``torch.load(weights_only=True)`` (no code runs) and checked against its checksum.
    ``FileNotFoundError`` when there is no file; :class:`CheckpointError` naming the problem for
    an empty, truncated or damaged file, one that is not a checkpoint or holds Python objects, one
    of another version, and one with missing keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} {what}")

    if path.stat().st_size == 0:
        raise refuse("is empty (0 bytes): a write that never completed; resume from another one")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not names:
            raise refuse("is damaged or not a checkpoint (its bytes are not a torch checkpoint's)") from None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
        except Exception:  # noqa: BLE001 - the names from the message do
            pass
        raise refuse(
            f"is refused: it holds Python objects ({', '.join(names)}) that only a "
            "load able to run code could build; a fraccompile checkpoint holds tensors "
            "and plain data"
        ) from None
    except Exception as e:  # noqa: BLE001 - every failure to read becomes one line
        if isinstance(e, EOFError) or is_zip:
            raise refuse(f"is truncated or damaged ({first_line(e)})") from None
        raise refuse(f"is not a checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or "version" not in state:
        raise refuse(f"is not a fraccompile checkpoint (a {type(state).__name__} without a version)")
    if state["version"] != CHECKPOINT_VERSION:
        raise refuse(f"has version {state['version']!r}; this fraccompile reads version {CHECKPOINT_VERSION}")
    checksum = state.pop("checksum", None)
    try:
        matches = checksum == state_checksum(state)
    except TypeError as e:
        raise refuse(f"is damaged ({e})") from None
    if not matches:
        raise refuse(
            "is damaged: its content does not match the checksum it was written with "
            "(bytes changed after it was saved)"
            if checksum
            else "has no checksum"
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise refuse(f"lacks {', '.join(map(repr, missing))} (missing keys): not a checkpoint fit() wrote")
    return state


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


def check_model_state(path, saved: dict[str, Any], model_state: dict[str, Any], exact: bool = True) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint whose model state does not fit
    ``model_state``: keys it lacks, keys the model does not have (with ``exact``) and tensors of
    another shape, in one line. ``exact=False`` checks a model before it is compiled (compiling
    adds keys, e.g. the activation ranges)."""
    missing = [k for k in model_state if k not in saved]
    extra = [k for k in saved if k not in model_state] if exact else []
    shapes = []
    for k in model_state:
        a, b = saved.get(k), model_state[k]
        if (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and not isinstance(b, torch.nn.parameter.UninitializedTensorMixin)
            and a.shape != b.shape
        ):
            shapes.append(f"{k}: {list(a.shape)} here {list(b.shape)}")
    if not (missing or extra or shapes):
        return

    def few(items):
        return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")

    parts = (
        ([f"lacks {few(missing)}"] if missing else [])
        + ([f"has unknown {few(extra)}"] if extra else [])
        + ([f"has other shapes ({few(shapes)})"] if shapes else [])
    )
    raise CheckpointError(
        f"checkpoint {path} does not fit this model: it {'; '.join(parts)} (written for another model?)"
    )


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's generator states as tensors and plain data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
