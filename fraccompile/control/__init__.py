"""Precision control: the controller every site reads from, and the schedules that drive it."""

from .controller import PrecisionController
from .schedules import PFQ, Cyclic, Schedule, Static

__all__ = ["PFQ", "Cyclic", "PrecisionController", "Schedule", "Static"]
