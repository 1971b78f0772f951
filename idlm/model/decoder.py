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

from . import kernels, native
from .attention import padded_keys, prefix_window_bias
from .config import ModelConfig
from .rope import RotaryTable, apply_rotary


class Proj(nn.Linear):
    """A linear layer whose forward takes an (ignored) per-token gate; LoRA subclasses use it.
    ``quant`` (a ``quant.QuantLinear``, set by ``quantize_model``) replaces the dense weight. Inference
    runs ``kernels.linear`` (row-stable); ``by_row`` (set by ``rowcheck`` when this machine's kernel
    failed the check) computes one row per call."""

    by_row = False

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        quant = self._modules.get("quant")
        if quant is not None:
            return quant(x)
        return kernels.linear(x, self.weight, self.bias, self.by_row)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (fp32 accumulation): idlm's in inference, PyTorch's in training. Equal to HF's
        # formula up to fp32 rounding; in bf16 it may round differently from HF in the last bit, which is
        # why parity is tested in fp32.
        return kernels.rms_norm(x, self.weight, self.eps)


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
    mask: torch.Tensor | None  # no cache: bool mask broadcastable to (B, H, T, S); True = attend
    causal: bool  # no cache and no mask: use is_causal
    bias: torch.Tensor | None = None  # cache: (B, T, S) additive mask for ``attend`` (S padded)
    paged: PagedBatch | None = None  # engine forward: pool slots and attention groups
    pool: PagedKV | None = None  # engine forward: the paged K/V tensors
    by_row: bool = False  # attention one query row per call (``Decoder.attn_by_row``)


QUERY_TILE = 256  # a long prefill attends in tiles of this many query rows (row-stable, so exact)


@dataclass
class PagedKV:
    """A paged K/V pool (owned by the engine): one slot per token, any slot order."""

    k: torch.Tensor  # (layers, Hkv, slots, D)
    v: torch.Tensor  # (layers, Hkv, slots, D)


@dataclass
class AttnGroup:
    """Sequences whose new rows attend together: R sequences padded to T rows and S keys."""

    rows: torch.Tensor  # (R, T) flat token index of each row (padding rows repeat a real one)
    bias: torch.Tensor  # (R, T, S) fp32 additive mask; S a multiple of attention.KEY_BLOCK
    src: torch.Tensor  # (n,) which of the R*T rows are real
    dst: torch.Tensor  # (n,) their flat token index
    key_blocks: torch.Tensor | None = None  # (R, S / block_size) pool block of every run of keys (padding:
    # the all-zero null block); the keys are gathered block by block
    key_range: int | None = None  # R == 1 and the keys are pool slots [key_range, key_range + S)
    dense: bool = False  # rows == arange(R*T) (the batch's first R*T tokens, no padding): slices, no gather


@dataclass
class PagedBatch:
    """A flat ragged batch over a paged pool: where each token's K/V goes, and who attends to what."""

    write_slots: torch.Tensor  # (n,) pool slot of each of the first n tokens' K/V; tokens past n are
    # padding (the batch is padded to a bucketed length so matmul shapes repeat) and write nothing
    groups: list[AttnGroup]  # every real token is a row of exactly one group
    write_range: int | None = None  # the write slots are [write_range, write_range + T): a slice
    block_size: int = 16  # slots per pool block (key_blocks index blocks of this size)
    native: native.NativeRows | None = None  # set (and groups empty) when the model runs the native forward


def _cache_attention(q: torch.Tensor, cache: KVCache, layer: int, bias: torch.Tensor, by_row: bool) -> torch.Tensor:
    """q (B, H, T, D) over the cache's first S slots (bias (B, T, S)) -> (B, T, H*D) (fp32, or the K/V
    dtype for one key block), in tiles of at most QUERY_TILE rows, each over the keys its rows can see."""
    b, h, t, d = q.shape
    hkv = cache.k.shape[2]
    q5 = q.view(b, hkv, h // hkv, t, d).transpose(0, 1)  # (Hkv, B, G, T, D)
    k, v = cache.k[layer].transpose(0, 1), cache.v[layer].transpose(0, 1)  # (Hkv, B, cap, D) views
    start = cache.length
    outs = []
    for lo in range(0, t, QUERY_TILE):
        hi = min(t, lo + QUERY_TILE)
        s = padded_keys(start + hi) if t > QUERY_TILE else bias.shape[2]
        outs.append(kernels.attend(q5[:, :, :, lo:hi], k[:, :, :s], v[:, :, :s], bias[:, lo:hi, :s], by_row))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 3)  # (Hkv, B, G, T, D)
    return o.permute(1, 3, 0, 2, 4).reshape(b, t, h * d)


def _paged_attention(q: torch.Tensor, pool: PagedKV, layer: int, batch: PagedBatch, by_row: bool) -> torch.Tensor:
    """q (1, H, T, D) of a flat batch -> (1, T, H*D) (as ``attend``): each group gathers its keys from the pool."""
    _, h, t, d = q.shape
    hkv = pool.k.shape[1]
    out = q.new_zeros(t, h * d, dtype=torch.float32)  # padding rows (no group) attend to nothing
    kl, vl = pool.k[layer], pool.v[layer]  # (Hkv, slots, D)
    for g in batch.groups:
        r, tg = g.rows.shape
        s = g.bias.shape[2]
        qg = q[0, :, : r * tg] if g.dense else q[0].index_select(1, g.rows.reshape(-1))
        qg = qg.view(hkv, h // hkv, r, tg, d).transpose(1, 2)
        if g.key_range is not None:
            k, v = kl[:, None, g.key_range: g.key_range + s], vl[:, None, g.key_range: g.key_range + s]
        else:
            idx, bs = g.key_blocks.reshape(-1), batch.block_size
            k = kl.view(hkv, -1, bs, d).index_select(1, idx).view(hkv, r, s, d)
            v = vl.view(hkv, -1, bs, d).index_select(1, idx).view(hkv, r, s, d)
        o = kernels.attend(qg, k, v, g.bias, by_row).permute(1, 3, 0, 2, 4).reshape(r * tg, h * d)
        if g.dense:
            if r * tg == t:
                return o[None]
            out[: r * tg] = o
        else:
            out[g.dst] = o[g.src].float()
    return out[None]


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
        return self.finish_merged(x, o.transpose(1, 2).reshape(b, t, self.cfg.q_size), gate)

    def finish_merged(self, x: torch.Tensor, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """``finish`` for an attention output already laid out as (B, T, H*D)."""
        x = x + self.o(o.to(x.dtype), gate)
        g, u = self.gate_up(self.ln2(x), gate).chunk(2, dim=-1)
        return x + self.down(kernels.silu_mul(g, u), gate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: _Attn,
                gate: torch.Tensor | None) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.project(x, cos, sin, gate)
        if attn.pool is not None:  # engine: write this forward's K/V into the pool, then attend
            self.write_pool(attn.pool, attn.paged, k, v)
            return self.finish_merged(x, _paged_attention(q, attn.pool, self.index, attn.paged, attn.by_row), gate)
        if attn.cache is not None:
            c, end = attn.cache, attn.start + t
            c.k[self.index, :, :, attn.start:end] = k
            c.v[self.index, :, :, attn.start:end] = v
            return self.finish_merged(x, _cache_attention(q, c, self.index, attn.bias, attn.by_row), gate)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.causal,
                                           enable_gqa=self.cfg.num_kv_heads != self.cfg.num_heads)
        return self.finish(x, o, gate)

    def forward_over(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                     gate: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Training step with an optional K/V prefix ``past`` (concatenated, not written in place, so
        autograd sees it) and an explicit mask over ``[past ; new]``. Returns the output and this call's own
        K/V. One method, so a sharded (FSDP) layer is gathered once per call."""
        q, k, v = self.project(x, cos, sin, gate)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                           enable_gqa=self.cfg.num_kv_heads != self.cfg.num_heads)
        return self.finish(x, o, gate), (k, v)

    def write_pool(self, pool: PagedKV, batch: PagedBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (1, Hkv, T, D) → this layer's pool slots ``batch.write_slots``."""
        n = batch.write_slots.shape[0]
        if batch.write_range is not None:
            a = batch.write_range
            pool.k[self.index, :, a:a + n] = k[0, :, :n]
            pool.v[self.index, :, a:a + n] = v[0, :, :n]
            return
        pool.k[self.index].index_copy_(1, batch.write_slots, k[0, :, :n])
        pool.v[self.index].index_copy_(1, batch.write_slots, v[0, :, :n])


_EMPTY_ROWS = torch.empty(0, dtype=torch.long)
_NO_WINDOW = torch.empty(1, 0, dtype=torch.uint8)


def _binary(gate: torch.Tensor) -> bool:
    return bool(((gate == 0) | (gate == 1)).all())


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
        self.head_quant: nn.Module | None = None  # quantized output head (``quant.quantize_model``)
        self.quant_mode = "none"
        # set by ``rowcheck`` when this machine's kernel failed the row-stability check: one row per call
        self.head_by_row = False
        self.attn_by_row = False
        self.draft_vocab: torch.Tensor | None = None  # tokens MASK rows may propose (``set_draft_vocab``)
        self.draft_head_quant: nn.Module | None = None  # the quantized head over draft_vocab's rows

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
               window_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, hidden). ids/positions: (B, T) or (T,).
        ``gate`` (B, T) or (T,) in {0, 1} switches gated LoRA adapters on per token.
        ``window_mask`` (T, T) bool (with a cache): which of this forward's own slots each new token
        sees (default causal); every new token sees the whole cached prefix. ISD uses it for
        fallback drafts, whose slots must not see the drafts they replace."""
        if input_ids.dim() == 1:
            input_ids, positions = input_ids[None], positions[None]
            gate = gate[None] if gate is not None else None
        b, t = input_ids.shape
        if cache is not None and b == 1 and attn_mask is None:
            plan = self.native_plan()
            if plan is not None and (gate is None or _binary(gate)):
                return self._hidden_native_cache(plan, input_ids[0], positions[0], cache,
                                                 None if gate is None else gate[0], window_mask)[None]
        attn = self._attn_args(b, t, cache, attn_mask, window_mask)
        x = self._run_layers(input_ids, positions, gate, attn)
        if cache is not None:
            cache.length = attn.start + t
        return x

    def hidden_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: PagedKV, batch: PagedBatch,
                     gate: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's forward: a flat ragged batch of T tokens from many sequences (ids, positions,
        gate: (T,)), K/V written to ``batch.write_slots`` of ``pool`` and attention per
        ``batch.groups``. Returns final-normed hidden states (T, hidden). Every row is computed
        exactly as ``hidden`` with a ``KVCache`` computes it (row-stable kernels, ``attend``)."""
        if batch.native is not None:
            plan = self.native_plan()
            if plan is None:
                raise RuntimeError("a native batch layout for a model that does not run natively")
            return self._forward_native(plan, input_ids, positions, gate, pool.k, pool.v, batch.write_slots,
                                        batch.native)
        attn = _Attn(None, 0, None, False, paged=batch, pool=pool, by_row=self.attn_by_row)
        return self._run_layers(input_ids[None], positions[None], None if gate is None else gate[None], attn)[0]

    # ---- the native forward (idlm/model/native): bf16 inference on the CPU ---------------------------

    def native_plan(self) -> native.Plan | None:
        """The native forward's weight plan, or None when this forward runs in Python (training, fp32,
        another device, the extension turned off or not buildable). Rebuilt when the weights it derived
        from change (an adapter loaded or trained, quantization)."""
        if torch.is_grad_enabled() or self.__dict__.get("_native_off"):
            return None
        if native.unsupported(self) is not None or not native.load():
            return None
        state = self.__dict__.get("_native_plan")
        if state is None or not state.fresh(self):
            state = native.Plan(self)
            self.__dict__["_native_plan"] = state
        return state

    def use_native(self, on: bool) -> None:
        """Turn the native forward off (or back on) for this model, e.g. to compare the two forwards."""
        self.__dict__["_native_off"] = not on

    @property
    def runs_native(self) -> bool:
        """True when inference forwards of this model take the native path."""
        with torch.inference_mode():
            return self.native_plan() is not None

    def _forward_native(self, plan: native.Plan, ids: torch.Tensor, positions: torch.Tensor,
                        gate: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
                        rows: native.NativeRows) -> torch.Tensor:
        x = self.embed(ids).contiguous()
        cos, sin = self.rope.lookup(positions, torch.float32)
        gated = _EMPTY_ROWS if gate is None else gate.reshape(-1).nonzero().reshape(-1)
        return plan.forward(x, cos, sin, gated, k, v, write_slots, rows)

    def _hidden_native_cache(self, plan: native.Plan, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                             gate: torch.Tensor | None, window_mask: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` over a batch-1 ``KVCache`` through the native forward: the cache is a pool whose
        logical key k is slot k."""
        t, start = ids.shape[0], cache.length
        cache.reserve(t)
        if window_mask is None:  # causal: row i sees keys [0, start + i]
            rows = native.NativeRows(_EMPTY_ROWS.new_zeros(t), torch.arange(start + 1, start + t + 1),
                                     torch.full((t,), start), _NO_WINDOW.expand(t, 0), _EMPTY_ROWS)
        else:
            if window_mask.shape != (t, t):
                raise ValueError(f"window_mask must be ({t}, {t}) bool")
            rows = native.NativeRows(_EMPTY_ROWS.new_zeros(t), torch.full((t,), start), torch.full((t,), start),
                                     window_mask.to(torch.uint8).contiguous(), _EMPTY_ROWS)
        out = self._forward_native(plan, ids, positions, gate, cache.k[:, 0], cache.v[:, 0],
                                   torch.arange(start, start + t), rows)
        cache.length = start + t
        return out

    def _run_layers(self, ids: torch.Tensor, positions: torch.Tensor, gate: torch.Tensor | None,
                    attn: _Attn) -> torch.Tensor:
        cos, sin = self.rope.lookup(positions, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
        g = gate[..., None].to(self.dtype) if gate is not None else None  # (B, T, 1)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn, g)
        return self.norm(x)

    def _attn_args(self, b: int, t: int, cache: KVCache | None, attn_mask: torch.Tensor | None,
                   window_mask: torch.Tensor | None = None) -> _Attn:
        if cache is None:
            if attn_mask is not None:
                mask = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask  # (B, 1, T, T)
                return _Attn(None, 0, mask, False)
            return _Attn(None, 0, None, t > 1)
        if attn_mask is not None:
            raise ValueError("pass either a cache (causal) or an attention mask, not both")
        if cache.batch != b:
            raise ValueError(f"cache batch {cache.batch} != input batch {b}")
        if window_mask is not None and window_mask.shape != (t, t):
            raise ValueError(f"window_mask must be ({t}, {t}) bool")
        start, dev = cache.length, cache.device
        s_len = padded_keys(start + t)
        cache.reserve(s_len - start)  # padded keys are read (and masked), so they must exist
        own = torch.ones(t, t, dtype=torch.bool, device=dev).tril() if window_mask is None else window_mask.to(dev)
        bias = prefix_window_bias(torch.full((b,), start, device=dev), own.expand(b, t, t), s_len)
        return _Attn(cache, start, None, False, bias=bias, by_row=self.attn_by_row)

    def head_weight(self) -> torch.Tensor:
        """(vocab, hidden): never includes an appended MASK row."""
        if self.lm_head is not None:
            return self.lm_head.weight
        return self.embed.weight[: self.cfg.vocab_size]

    def logits(self, hidden: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (..., vocab) in fp32. MASK is never a valid output: an in-vocabulary MASK
        id gets -inf, an appended MASK row is not scored at all. ``drafts`` (bool, hidden's leading shape):
        rows that only propose drafts (MASK rows); with a draft vocabulary (``set_draft_vocab``) they score
        its tokens only and every other token gets -inf. Other rows always score the whole vocabulary, so
        what is verified and emitted never changes."""
        # always a 2-D matmul: a 1-D input takes a gemv path that rounds differently
        flat = hidden.reshape(-1, hidden.shape[-1])
        sub = None
        if drafts is not None and self.draft_vocab is not None:
            sub = drafts.reshape(-1).to(torch.bool)
            if not bool(sub.any()):
                sub = None
        if sub is None:
            y = self._head(flat)
        else:
            y = torch.full((flat.shape[0], self.cfg.vocab_size), float("-inf"))
            full = (~sub).nonzero().reshape(-1)
            if full.numel():
                y[full] = self._head(flat[full]).float()
            rows = sub.nonzero().reshape(-1)
            y[rows[:, None], self.draft_vocab[None, :]] = self._draft_head(flat[rows]).float()
        out = y.float().view(*hidden.shape[:-1], -1)
        if not self.cfg.mask_is_new_row:
            out[..., self.cfg.mask_token_id] = float("-inf")
        return out

    def _head(self, flat: torch.Tensor) -> torch.Tensor:
        if self.head_quant is not None:
            return kernels.per_row(self.head_quant, flat) if self.head_by_row else self.head_quant(flat)
        return kernels.linear(flat, self.head_weight(), None, self.head_by_row)

    def _draft_head(self, flat: torch.Tensor) -> torch.Tensor:
        hq = self.draft_head_quant
        if hq is not None:
            return kernels.per_row(hq, flat) if self.head_by_row else hq(flat)
        return kernels.linear(flat, self.head_weight()[self.draft_vocab], None, self.head_by_row)

    def set_draft_vocab(self, ids: torch.Tensor | list[int] | None) -> None:
        """Let MASK rows score only ``ids`` (None: the whole vocabulary again). Drafts then come from these
        tokens; verification and output are unchanged. A quantized head gets its own kernel over these rows
        (``quant.quantize_model`` builds it), so set this before quantizing."""
        if ids is None:
            self.draft_vocab = self.draft_head_quant = None
            return
        t = torch.as_tensor(ids, dtype=torch.long).unique()
        if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size:
            raise ValueError(f"draft vocabulary ids must be in 0..{self.cfg.vocab_size - 1}")
        if self.head_quant is not None:
            raise ValueError("set the draft vocabulary before quantizing (its head kernel is built then)")
        self.draft_vocab = t

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every input position, (B, T, vocab) fp32."""
        return self.logits(self.hidden(input_ids, positions, cache, attn_mask, gate))
