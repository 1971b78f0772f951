"""The serving engine: continuous batching of ISD / AR requests over a paged KV cache.

Token ids only; nothing here tokenizes or parses JSON. ``LLMEngine`` (add_request / step / abort /
generate) is the synchronous core; ``AsyncEngine`` runs its step loop in a background thread for
the server.
"""

from .async_engine import AsyncEngine, EngineDeadError, EngineStepError
from .block_manager import BlockManager, OutOfBlocks
from .engine import EngineConfig, LLMEngine
from .request import Completion, RequestOutput, TokenLogprob
from .scheduler import SchedulerConfig
from .stride import CostModel, WindowPolicy

__all__ = [
           "AsyncEngine",
           "BlockManager",
           "Completion",
           "CostModel",
           "EngineConfig",
           "EngineDeadError",
           "EngineStepError",
           "LLMEngine",
           "OutOfBlocks",
           "RequestOutput",
           "SchedulerConfig",
           "TokenLogprob",
           "WindowPolicy",
]
