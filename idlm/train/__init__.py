"""Training side of I-DLM (spec §1–2, §4): the ``[x_t | x_0]`` collator and training mask, the losses, the
training loop (full fine-tuning or gated LoRA) and saving the result (the data it trains on is ``idlm.data``'s).

Entry point for the CLI: ``run_convert(ConvertConfig)``; ``load_converted(path)`` loads a result for inference.
"""

from __future__ import annotations

from .batch import TrainBatch, collate
from .checkpoint import ConvertedMeta, LoadedConverted, load_converted
from .config import ConvertConfig, Stage, parse_stages
from .loop import ConvertResult, run_convert
from .mask import idlm_mask, training_mask

__all__ = ["ConvertConfig", "ConvertResult", "ConvertedMeta", "LoadedConverted", "Stage", "TrainBatch", "collate",
           "idlm_mask", "load_converted", "parse_stages", "run_convert", "training_mask"]
