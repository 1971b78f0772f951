"""Counters, per request (``DecodeStats``) and engine-wide (``EngineMetrics``), both extending the one
definition of draft-verification counters (``VerifyCounters``, recording a step's ``VerifyStep``).
Counters only; rates (TPF, acceptance, usage) are properties computed at read time. A leaf package: it
imports nothing from idlm."""

from .engine import EngineMetrics
from .request import DecodeStats
from .verify import VerifyCounters, VerifyStep

__all__ = ["DecodeStats", "EngineMetrics", "VerifyCounters", "VerifyStep"]
