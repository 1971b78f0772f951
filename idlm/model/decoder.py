"""Our compact decoder for the Llama / Qwen2 / Qwen3 families.

``Decoder.forward(input_ids, positions, ...)`` always takes explicit positions and one of three
attention specs:

* a ``KVCache``: the new tokens are appended to the cache and attend causally to everything before
  them (prefill, AR step, ISD window). The caller rolls back with ``cache.crop(n)``.
* ``attn_mask``: an arbitrary boolean mask (True = may attend), e.g. the training mask of spec §1.4.
* neither: plain causal attention over the given tokens.

Projections are fused (q|k|v and gate|up) so a forward is few, large matmuls. Each projection is a
``Proj`` that accepts an optional per-token gate, which the gated LoRA of R-ISD uses (``lora.py``).
The model knows nothing about requests, sampling or text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import RotaryTable, apply_rotary


def row_stable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose result for a row does not depend on how many rows are in the batch.

    CPU matmul kernels pick their blocking from the row count M, and different blockings round
    differently, so a one-token AR step and a multi-token ISD window would disagree in the last bit
    and greedy decoding could flip at near-ties. Measured on this CPU (2 threads): bf16 rows agree
    bit for bit for every M >= 2 (M = 1 takes a different kernel for some shapes, e.g. 576x1536);
    fp32 (MKL) rows agree for every M that is a multiple of 4. So in inference rows are padded up to
    the next stable count; the matmul is memory-bound, so the extra rows are nearly free in bf16.
    """
    m = x.numel() // x.shape[-1]
    quantum = 4 if x.dtype == torch.float32 else 2
    if m % quantum == 0 or (x.dtype != torch.float32 and m > 1) or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    flat = x.reshape(m, -1)
    pad = flat.new_zeros(quantum - m % quantum, flat.shape[1])
    out = F.linear(torch.cat([flat, pad]), weight, bias)[:m]
    return out.view(*x.shape[:-1], weight.shape[0])


class Proj(nn.Linear):
    """A linear layer whose forward takes an (ignored) per-token gate; LoRA subclasses use it."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return row_stable_linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (fp32 accumulation). Equal to HF's formula in fp32; in bf16 it may round
        # differently from HF in the last bit, which is why parity is tested in fp32.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class KVCache:
    """Contiguous per-layer K/V for a batch of sequences that share one length.

    ``length`` is the number of committed slots; rollback is ``crop(n)``: index arithmetic only.
    Storage is pre-allocated to ``capacity`` slots and grown by doubling when needed.
    """

    def __init__(self, cfg: ModelConfig, batch: int = 1, capacity: int = 1024,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.cfg, self.batch, self.dtype, self.device = cfg, batch, dtype, device
        self.length = 0
        self.k = self.v = torch.empty(0)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        shape = (self.cfg.num_layers, self.batch, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.length:
            k[..., : self.length, :] = self.k[..., : self.length, :]
            v[..., : self.length, :] = self.v[..., : self.length, :]
        self.k, self.v = k, v

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, extra: int) -> None:
        if self.length + extra > self.capacity:
            self._alloc(max(2 * self.capacity, self.length + extra))

    def crop(self, n: int) -> None:
        """Keep the first ``n`` slots (KV rollback)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n


@dataclass
class _Attn:
    """Per-forward attention arguments shared by all layers."""

    cache: KVCache | None  # append-and-attend cache, or None
    start: int  # first cache slot written by this forward
    mask: torch.Tensor | None  # bool mask broadcastable to (B, H, T, S); True = attend
    causal: bool  # use is_causal (no mask, no cache)
    row_keys: list[int | torch.Tensor] | None = None  # row-wise path: per query, a key count (the
    # prefix [0, n)) or the explicit key slots


SMALL_WINDOW = 64  # windows up to this many tokens (ISD: N = 8 with fallback) use the explicit attention below


def _small_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a few new queries over a cached prefix, as three plain ops.

    q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: (T, S) bool or None. Query heads that share a K/V head
    are stacked along the row axis so GQA needs no K/V copy. On CPU this is several times faster than
    the fused SDPA kernel for T <= 16 in bf16. Softmax runs in fp32.
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    q3 = q.reshape(b * hkv, g * t, d)
    k3, v3 = k.reshape(b * hkv, s, d), v.reshape(b * hkv, s, d)  # views of the cache (no copy)
    scores = torch.bmm(q3, k3.transpose(1, 2)).float() * d ** -0.5  # (B*Hkv, G*T, S)
    if mask is not None:  # (T, S) or (B, 1, T, S)
        m = mask if mask.dim() == 2 else mask[:, :, None]  # (B, 1, 1, T, S)
        scores = scores.view(b, hkv, g, t, s).masked_fill(~m, float("-inf")).view(b * hkv, g * t, s)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.bmm(probs, v3).view(b, h, t, d)


def _causal(t: int, device: torch.device | str) -> torch.Tensor:
    """(T, T) bool, True on and below the diagonal."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def _row_kv(k: torch.Tensor, v: torch.Tensor, keys: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(keys, int):  # a prefix: a view, exactly what a one-token step reads
        return k[:, :, :keys], v[:, :, :keys]
    return k.index_select(2, keys), v.index_select(2, keys)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.ln1 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.ln2 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.qkv = Proj(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o = Proj(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.gate_up = Proj(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = Proj(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gate: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input → rotated q (B, H, T, D), rotated k and v (B, Hkv, T, D)."""
        cfg = self.cfg
        b, t, _ = x.shape
        heads = cfg.num_heads + 2 * cfg.num_kv_heads
        qkv = self.qkv(self.ln1(x), gate).view(b, t, heads, cfg.head_dim)  # (B, T, H + 2Hkv, D)
        qk, v = qkv[:, :, : cfg.num_heads + cfg.num_kv_heads], qkv[:, :, cfg.num_heads + cfg.num_kv_heads:]
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :, : cfg.num_heads]), self.k_norm(qk[:, :, cfg.num_heads:])], 2)
        qk = apply_rotary(qk.transpose(1, 2), cos, sin)  # q and k rotated together: (B, H + Hkv, T, D)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads:], v.transpose(1, 2)

    def finish(self, x: torch.Tensor, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Attention output o (B, H, T, D) → output projection, residual, MLP block."""
        b, t, _ = x.shape
        x = x + self.o(o.transpose(1, 2).reshape(b, t, self.cfg.q_size), gate)
        g, u = self.gate_up(self.ln2(x), gate).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u, gate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: _Attn,
                gate: torch.Tensor | None) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.project(x, cos, sin, gate)
        if attn.cache is not None:
            c, end = attn.cache, attn.start + t
            c.k[self.index, :, :, attn.start:end] = k
            c.v[self.index, :, :, attn.start:end] = v
            k, v = c.k[self.index, :, :, :end], c.v[self.index, :, :, :end]
        if attn.row_keys is not None:
            # fp32: row by row over exactly the keys each query may see, the same ops and shapes as
            # a one-token step, so a window reproduces AR's numbers bit for bit (MKL's fp32 bmm
            # rounds a row differently depending on the row count). See _attn_args for bf16.
            o = torch.cat([_small_window_attention(q[:, :, i:i + 1], *_row_kv(k, v, r), None)
                           for i, r in enumerate(attn.row_keys)], 2)
        elif attn.cache is not None and t <= SMALL_WINDOW:
            o = _small_window_attention(q, k, v, attn.mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.causal,
                                               enable_gqa=self.cfg.num_kv_heads != self.cfg.num_heads)
        return self.finish(x, o, gate)


class Decoder(nn.Module):
    """Embedding → layers → final norm; ``logits`` applies the output head separately so callers
    pay for the vocabulary projection only at the positions they read."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.num_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryTable(cfg)

    @property
    def has_adapters(self) -> bool:
        """True when gated LoRA adapters are attached (R-ISD): drafts then need gate = 1 on MASK slots."""
        return any(hasattr(m, "lora_A") for m in self.modules())

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch: int = 1, capacity: int = 1024) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.dtype, self.embed.weight.device)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
               attn_mask: torch.Tensor | None = None, gate: torch.Tensor | None = None,
               key_valid: torch.Tensor | None = None, window_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, hidden). ids/positions: (B, T) or (T,).
        ``gate`` (B, T) or (T,) in {0, 1} switches gated LoRA adapters on per token.
        ``key_valid`` (B, cache.length + T) bool marks real (non-padding) cache slots for batched
        decoding of left-padded prompts; a padding slot attends only to itself.
        ``window_mask`` (T, T) bool (batch 1, with a cache): which of this forward's own slots each
        new token sees (default causal); every new token sees the whole cached prefix. ISD uses it
        for fallback drafts, whose slots must not see the drafts they replace."""
        if input_ids.dim() == 1:
            input_ids, positions = input_ids[None], positions[None]
            gate = gate[None] if gate is not None else None
        b, t = input_ids.shape
        attn = self._attn_args(b, t, cache, attn_mask, key_valid, window_mask)
        cos, sin = self.rope.lookup(positions, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
        g = gate[..., None].to(self.dtype) if gate is not None else None  # (B, T, 1)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn, g)
        if cache is not None:
            cache.length = attn.start + t
        return self.norm(x)

    def _attn_args(self, b: int, t: int, cache: KVCache | None, attn_mask: torch.Tensor | None,
                   key_valid: torch.Tensor | None = None, window_mask: torch.Tensor | None = None) -> _Attn:
        if cache is not None:
            if attn_mask is not None:
                raise ValueError("pass either a cache (causal) or an attention mask, not both")
            if cache.batch != b:
                raise ValueError(f"cache batch {cache.batch} != input batch {b}")
            if window_mask is not None and (b != 1 or key_valid is not None or window_mask.shape != (t, t)):
                raise ValueError(f"window_mask must be ({t}, {t}) bool, for batch 1 without key_valid")
            start = cache.length
            cache.reserve(t)
            dev = cache.device
            # bf16 windows take one masked multi-row attention: measured bit-identical, row for row,
            # to the one-token step (tests/model/test_window_exact.py). fp32 windows go row by row.
            if b == 1 and t <= SMALL_WINDOW and key_valid is None and (t == 1 or self.dtype == torch.float32):
                wm = None if window_mask is None else window_mask.to(dev)
                return _Attn(cache, start, None, False, self._row_keys(start, t, wm))
            if t == 1 and key_valid is None:
                return _Attn(cache, start, None, False)
            own = _causal(t, dev) if window_mask is None else window_mask.to(dev)
            mask = torch.cat([torch.ones(t, start, dtype=torch.bool, device=dev), own], 1)  # (T, S)
            if key_valid is not None:  # (B, 1, T, S): real keys, and every slot sees itself
                keys = torch.arange(start + t, device=dev)
                slots = start + torch.arange(t, device=dev)
                mask = (mask & key_valid[:, None, :]) | (keys[None, :] == slots[:, None])
                mask = mask[:, None]
            return _Attn(cache, start, mask, False)
        if attn_mask is not None:
            mask = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask  # (B, 1, T, T)
            return _Attn(None, 0, mask, False)
        return _Attn(None, 0, None, t > 1)

    @staticmethod
    def _row_keys(start: int, t: int, window_mask: torch.Tensor | None) -> list[int | torch.Tensor]:
        """Per query of a row-wise window: a key count (a causal prefix, read as a view of the cache,
        exactly as a one-token step reads it) or, for a row the window mask makes non-causal, the
        explicit key slots."""
        if window_mask is None:  # the common case (every AR step): no mask work at all
            return [start + i + 1 for i in range(t)]
        causal = _causal(t, window_mask.device)
        prefix = torch.arange(start, device=window_mask.device)
        return [start + i + 1 if torch.equal(window_mask[i], causal[i])
                else torch.cat([prefix, start + window_mask[i].nonzero()[:, 0]]) for i in range(t)]

    def head_weight(self) -> torch.Tensor:
        """(vocab, hidden): never includes an appended MASK row."""
        if self.lm_head is not None:
            return self.lm_head.weight
        return self.embed.weight[: self.cfg.vocab_size]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab) in fp32. MASK is never a valid output: an in-vocabulary MASK
        id gets -inf, an appended MASK row is not scored at all."""
        flat = hidden.reshape(-1, hidden.shape[-1])  # always a 2-D matmul: a 1-D input takes a gemv
        out = row_stable_linear(flat, self.head_weight()).float().view(*hidden.shape[:-1], -1)  # path that rounds differently
        if not self.cfg.mask_is_new_row:
            out[..., self.cfg.mask_token_id] = float("-inf")
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every input position, (B, T, vocab) fp32."""
        return self.logits(self.hidden(input_ids, positions, cache, attn_mask, gate))
