"""Exceptions with one-line, actionable messages (the CLI prints ``str(err)`` and exits non-zero)."""

from __future__ import annotations


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
