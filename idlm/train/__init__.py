"""Training side of I-DLM (spec §1–2, §4): self-distillation data, the ``[x_t | x_0]`` collator and
training mask, the losses, the training loop (full fine-tuning or gated LoRA) and export.

Entry points for the CLI: ``run_convert(ConvertConfig)`` and ``run_data_generate(DataGenConfig)``;
``load_converted(path)`` loads a result for inference.
"""

from __future__ import annotations

from .batch import Sample, TrainBatch, collate
from .config import ConvertConfig, DataGenConfig, Stage, field_help, parse_stages
from .data import generate_data, load_prompts, load_samples, run_data_generate
from .export import ConvertedMeta, LoadedConverted, load_converted
from .loop import ConvertResult, run_convert
from .mask import idlm_mask, training_mask

__all__ = ["ConvertConfig", "ConvertResult", "ConvertedMeta", "DataGenConfig", "LoadedConverted", "Sample",
           "Stage", "TrainBatch", "collate", "field_help", "generate_data", "idlm_mask", "load_converted",
           "load_prompts", "load_samples", "parse_stages", "run_convert", "run_data_generate",
           "training_mask"]
