"""Counters, per request (``DecodeStats``) and engine-wide (``EngineMetrics``). Counters only; rates
(TPF, acceptance, usage) are properties computed at read time. A leaf package: it imports nothing
from idlm."""

from .engine import EngineMetrics
from .request import DecodeStats

__all__ = ["DecodeStats", "EngineMetrics"]
