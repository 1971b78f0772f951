"""Tests of idlm.model: HF parity, KV cache, attention masks, loading."""
