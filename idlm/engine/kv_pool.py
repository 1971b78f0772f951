"""The paged K/V pool: one zero-initialised tensor pair sized in blocks, from a memory budget."""

from __future__ import annotations

import os

import torch

from ..config import ConfigError
from ..model.config import ModelConfig
from ..model.decoder import PagedKV

DEFAULT_KV_FRACTION = 0.25  # of available memory, when no --kv-cache-gb is given
DEFAULT_KV_CAP_GB = 4.0  # ... but at most this much


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def available_memory() -> int:
    """Bytes of memory available to allocate (Linux MemAvailable; else total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def num_blocks_for(cfg: ModelConfig, dtype: torch.dtype, block_size: int, kv_cache_gb: float | None,
                   max_tokens: int | None = None) -> int:
    """How many blocks fit in ``kv_cache_gb`` GiB. Default: a quarter of available memory, at most
    4 GiB, and no more than ``max_tokens`` (what the running requests can ever hold) needs. At
    least 2 (the null block and one usable block)."""
    if kv_cache_gb is None:
        budget = min(DEFAULT_KV_FRACTION * available_memory(), DEFAULT_KV_CAP_GB * 2 ** 30)
        if max_tokens is not None:
            budget = min(budget, (max_tokens + 2 * block_size) * bytes_per_token(cfg, dtype))
    else:
        if not kv_cache_gb > 0:
            raise ConfigError(f"--kv-cache-gb must be > 0, got {kv_cache_gb}", "kv_cache_gb")
        budget = kv_cache_gb * 2 ** 30
    n = int(budget // (bytes_per_token(cfg, dtype) * block_size))
    if n < 2:
        raise ConfigError(f"--kv-cache-gb {kv_cache_gb} holds fewer than 2 blocks of {block_size} tokens",
                          "kv_cache_gb")
    return n


def new_pool(cfg: ModelConfig, dtype: torch.dtype, num_blocks: int, block_size: int,
             device: torch.device | str = "cpu") -> PagedKV:
    """Zeros, so padding keys (the null block) and never-written slots are finite."""
    shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
    return PagedKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
