"""Precision control: the controller every site reads from, and the schedules that drive it."""

from .controller import PrecisionController
from .schedules import DFQ, PFQ, Cyclic, FracTrain, Schedule, Static, as_schedule, cost_regularizer

__all__ = [
    "DFQ",
    "PFQ",
    "Cyclic",
    "FracTrain",
    "PrecisionController",
    "Schedule",
    "Static",
    "as_schedule",
    "cost_regularizer",
]
