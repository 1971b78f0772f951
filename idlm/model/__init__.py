"""Model package: config, decoder, RoPE, weight loading."""

from .config import ModelConfig, UnsupportedModelError
from .decoder import Decoder, KVCache
from .loading import (
    DEFAULT_MODEL,
    DTYPES,
    USER_ERRORS,
    LoadedModel,
    ModelLoadError,
    load_folder,
    load_for_inference,
    load_model,
)

__all__ = ["DEFAULT_MODEL", "DTYPES", "USER_ERRORS", "Decoder", "KVCache", "LoadedModel", "ModelConfig", "ModelLoadError",
           "UnsupportedModelError", "load_folder", "load_for_inference", "load_model"]
