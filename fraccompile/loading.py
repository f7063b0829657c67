"""Load a model from ``PATH.py[:NAME]`` and make example inputs for it (used by the CLI)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, ShapeError


def split_model_spec(spec: str) -> tuple[Path, str | None]:
    path, sep, name = spec.partition(".py:")
    if sep:
        return Path(path + ".py"), name or None
    return Path(spec), None


def load_module_from_file(path: Path):
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.suffix != ".py":
        raise ModelLoadError(f"model file {path} is not a Python file (.py)")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    mod_name = f"_fraccompile_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except SystemExit as err:  # a script, not a model file: its exit must not end fraccompile
        del sys.modules[mod_name]
        raise ModelLoadError(
            f"cannot import {path}: it called sys.exit({err.code!r}) while being "
            "imported; put its script part under "
            '`if __name__ == "__main__":`'
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure in user code becomes one line
        del sys.modules[mod_name]
        raise ModelLoadError(f"cannot import {path}: {type(err).__name__}: {err}") from err
    return module


def _candidates(module) -> list[str]:
    classes = [
        n
        for n, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    ]
    return classes


def load_model(spec: str) -> nn.Module:
    """``PATH.py[:NAME]``: NAME is an ``nn.Module`` class (built with no arguments) or a factory;
    without NAME, a ``model()`` factory or the file's only ``nn.Module`` subclass."""
    path, name = split_model_spec(spec)
    module = load_module_from_file(path)
    classes = _candidates(module)
    if name is None:
        if callable(getattr(module, "model", None)):
            name = "model"
        elif len(classes) == 1:
            name = classes[0]
        else:
            raise ModelLoadError(
                f"{path} defines {len(classes)} nn.Module classes ({', '.join(classes) or 'none'}) "
                f"and no model() factory: name one as {path}:NAME"
            )
    obj = getattr(module, name, None)
    if obj is None:
        factories = [
            n for n, o in vars(module).items() if inspect.isfunction(o) and o.__module__ == module.__name__
        ]
        raise ModelLoadError(
            f"{path} has no {name!r}; classes: {', '.join(classes) or 'none'}; "
            f"functions: {', '.join(factories) or 'none'}"
        )
    if not callable(obj):
        raise ModelLoadError(f"{path}:{name} is not a class or factory")
    try:
        model = obj()
    except TypeError as err:
        raise ModelLoadError(
            f"cannot build {path}:{name} without arguments ({err}); add a factory function that takes none"
        ) from err
    except SystemExit as err:
        raise ModelLoadError(f"{path}:{name}() called sys.exit({err.code!r})") from None
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path}:{name}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{path}:{name}() returned {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ShapeError(f"--input-shape {text!r} must be comma-separated positive integers, e.g. 8,3,32,32")
    return shape


def example_input(
    model: nn.Module, shape: tuple[int, ...], dtype: str = "auto", seed: int = 0
) -> torch.Tensor:
    """A random input of ``shape``: token ids in range for models that start with an embedding
    (``dtype="auto"`` detects an ``nn.Embedding``), else standard normal floats."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if dtype == "auto":
        dtype = "int64" if embeddings else "float32"
    if dtype in ("int64", "long"):
        high = min((e.num_embeddings for e in embeddings), default=2)
        return torch.randint(0, high, shape, generator=gen)
    if dtype in ("float32", "float"):
        return torch.randn(shape, generator=gen)
    raise ShapeError(f"--dtype {dtype!r} is not supported: choose auto, float32 or int64")
