"""Exceptions with one-line, actionable messages (the CLI prints ``str(err)`` and exits non-zero)."""

from __future__ import annotations

import importlib

# pip extras of the package and the modules each one installs
EXTRAS = {"tune": ("tornado", "psutil", "cloudpickle", "xgboost")}


class FracCompileError(Exception):
    """Base class of every error fraccompile raises on bad input."""


class ConfigError(FracCompileError, ValueError):
    """A configuration field has a bad value; the message names the field and the allowed values."""


class CaptureError(FracCompileError):
    """Neither torch.fx nor torch.export could capture the model."""


class ShapeError(FracCompileError):
    """The example inputs do not fit the model."""


class ModelLoadError(FracCompileError):
    """A model file or the model inside it could not be loaded."""


class PassError(FracCompileError):
    """An unknown pass or pipeline name, or a pass that left an invalid graph."""


class MissingDependencyError(FracCompileError, ImportError):
    """A module of an optional extra is not installed; the message names what needs it and the
    pip command that installs it."""


def require_extra(extra: str, purpose: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingDependencyError` unless ``modules`` (default: every module of the
    ``extra``) import: ``purpose`` says what needs them."""
    missing = []
    for name in EXTRAS[extra] if modules is None else modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"{purpose} needs {', '.join(missing)} (the {extra!r} extra), which is not installed: "
            f"pip install 'fraccompile[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
        )
