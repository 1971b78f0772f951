"""Other serving engines: `idlm export` lays a converted model out for vLLM (a parallel-drafting draft model)
or for the reference I-DLM SGLang fork (``export.export_for``)."""

from .export import TARGETS, EngineExport, ExportError, export_for

__all__ = ["TARGETS", "EngineExport", "ExportError", "export_for"]
