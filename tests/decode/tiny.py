"""Test helpers: a tiny random decoder with peaked logits, and an oracle LM with scripted drafts."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from idlm.model import Decoder, ModelConfig


def tiny_model(seed: int = 0, family: str = "llama", vocab: int = 96, layers: int = 2) -> Decoder:
    """A random decoder whose logits are spread over several units, so greedy has no near-ties."""
    cfg = ModelConfig(model_type=family, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_embeddings=False,
                      qk_norm=family == "qwen3", mask_token_id=vocab, num_embeddings=vocab + 1,
                      eos_token_ids=(vocab - 1,))
    g = torch.Generator().manual_seed(seed)
    m = Decoder(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 2.0 / p.shape[1] ** 0.5))
    return m.eval().requires_grad_(False)


class _OracleCache:
    def __init__(self) -> None:
        self.length = 0
        self.tokens: list[int] = []  # the input id stored in each slot

    def crop(self, n: int) -> None:
        assert 0 <= n <= self.length
        self.length = n
        del self.tokens[n:]


class OracleLM:
    """Scripted model of a fixed text ``seq`` (prompt included).

    A clean slot at position i predicts seq[i+1]. A MASK slot at position i predicts seq[i+1] too
    (so drafts are right) unless i is in ``wrong``, where it predicts ``seq[i+1] + 1`` (a draft that
    will be rejected). Logits are one-hot * 10. The cache records which ids occupy each slot, so
    tests can check that no MASK survives a step.
    """

    def __init__(self, seq: list[int], vocab: int = 50, wrong: set[int] = frozenset(), eos: int = 49):
        self.seq, self.vocab, self.wrong = seq, vocab, set(wrong)
        self.cfg = SimpleNamespace(mask_token_id=vocab, eos_token_ids=(eos,), vocab_size=vocab)
        self.forwards = 0
        self.has_adapters = False
        self.draft_vocab = None  # the decoder protocol: no draft vocabulary, every row scores the whole head

    def new_cache(self, batch: int = 1, capacity: int = 0) -> _OracleCache:
        return _OracleCache()

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache: _OracleCache, gate=None,
               window_mask=None) -> torch.Tensor:
        if window_mask is None:
            assert positions.tolist() == list(range(cache.length, cache.length + len(ids))), "positions not contiguous"
        else:  # fallback branches repeat positions; the slots before them are still contiguous
            assert positions[0] == cache.length and window_mask.shape == (len(ids), len(ids))
        self.forwards += 1
        cache.tokens += ids.tolist()
        cache.length += len(ids)
        is_mask = (ids == self.cfg.mask_token_id).float()
        return torch.stack([positions.float(), is_mask], -1)[None]  # (1, T, 2)

    def logits(self, h: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros(*h.shape[:-1], self.vocab)
        flat, rows = out.view(-1, self.vocab), h.reshape(-1, 2)
        for r, (pos, is_mask) in enumerate(rows.tolist()):
            nxt = int(pos) + 1
            tok = self.seq[nxt] if nxt < len(self.seq) else self.cfg.eos_token_ids[0]
            if is_mask and int(pos) in self.wrong:
                tok = (tok + 1) % (self.vocab - 1)
            flat[r, tok] = 10.0
        return out


class MarkovLM:
    """A model whose anchor is a Markov chain and whose drafts ignore context.

    A clean slot holding token a has logits ``anchor[a]``; every MASK slot has logits ``draft``. So
    the exact distribution of any emitted sequence is known in closed form (a product of anchor
    rows), while drafts disagree with it often enough that rejections, corrections and fallback
    drafts are all exercised."""

    def __init__(self, anchor: torch.Tensor, draft: torch.Tensor):
        self.anchor, self.draft = anchor, draft
        vocab = anchor.shape[-1]
        self.cfg = SimpleNamespace(mask_token_id=vocab, eos_token_ids=(), vocab_size=vocab)
        self.has_adapters = False
        self.draft_vocab = None  # the decoder protocol: no draft vocabulary, every row scores the whole head

    def new_cache(self, batch: int = 1, capacity: int = 0) -> _OracleCache:
        return _OracleCache()

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache: _OracleCache, gate=None,
               window_mask=None) -> torch.Tensor:
        cache.tokens += ids.tolist()
        cache.length += len(ids)
        return ids[None, :, None].float()

    def logits(self, h: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        ids = h[..., 0].long()
        is_mask = ids == self.cfg.mask_token_id
        return torch.where(is_mask[..., None], self.draft, self.anchor[ids.clamp_max(len(self.anchor) - 1)])


def tiny_risd_pair(seed: int, vocab: int = 96) -> tuple[Decoder, Decoder]:
    """(base, the same base with a random gated LoRA adapter and MASK row): for R-ISD losslessness tests."""
    from idlm.model.lora import add_lora

    base = tiny_model(seed=seed, vocab=vocab)
    adapted = tiny_model(seed=seed, vocab=vocab)
    add_lora(adapted, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name or "mask_row" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return base, adapted
