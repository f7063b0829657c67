"""Precision control: the controller every site reads from (schedules and gates come later)."""

from .controller import PrecisionController

__all__ = ["PrecisionController"]
