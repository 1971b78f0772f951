"""Data the engine writes for training: self-distillation answers of the base model (``selfdistill``),
prompts the base model writes itself (``magpie``), the built-in prompt mix (``prompts``), and the records
read back as ``Sample``s (``records``)."""

from .records import LazyTokenizer, Sample, load_samples
from .selfdistill import DataGenConfig, generate_data, load_prompts, run_data_generate

__all__ = ["DataGenConfig", "LazyTokenizer", "Sample", "generate_data", "load_prompts", "load_samples",
           "run_data_generate"]
