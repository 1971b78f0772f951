"""Attention over a key prefix on PyTorch's kernels, made as row-stable as they allow, and the masks of
every inference path.

``kernels.attend`` runs idlm's native attention when it is built (fixed order by construction); this
module is its fallback without a C++ compiler. Greedy output can only be independent of the batch if each
query row's attention output is a function of that row's query and the keys it may see, and of nothing
else: not of how many other rows share the call, not of how many padded keys follow its last visible
key, not of the memory layout the keys came from. ``attend_torch`` fixes every reduction to a shape that
does not depend on the call as far as PyTorch's kernels allow:

1. keys are padded to a multiple of ``KEY_BLOCK`` (the padding is masked and its values are zero);
2. scores ``q kᵀ`` reduce over the head dim only (fixed); fp32 row counts are padded to a multiple of 4;
3. one fused softmax per row over the padded keys (masked keys contribute exact zeros);
4. ``p v`` runs per key block of ``KEY_BLOCK`` keys (a fixed reduction length), and the per-block
   partial outputs are summed in fp32 by a pairwise tree over *absolute* block indices, so blocks
   of zeros after a row's last visible key change nothing.

Whether a matmul kernel then rounds a row the same in every row count is the kernel's choice, which
differs between CPUs: ``rowcheck`` tests it at load, and a failing attention runs query row by row.
"""

from __future__ import annotations

import torch

KEY_BLOCK = 128  # keys per reduction block of p·v (and the padding quantum of every key range)


def padded_keys(n: int) -> int:
    """Key count ``n`` rounded up to a multiple of KEY_BLOCK."""
    return -(-n // KEY_BLOCK) * KEY_BLOCK


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 by pairs (0,1), (2,3), ... then pairs of pairs: the same additions in the same
    order for block b whatever the total block count, since x + 0 == x exactly."""
    while x.shape[1] > 1:
        n = x.shape[1]
        pairs = x[:, 0:n - 1:2] + x[:, 1::2]
        x = torch.cat([pairs, x[:, n - 1:]], 1) if n % 2 else pairs
    return x[:, 0]


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention on PyTorch's kernels (see the module docstring).

    q: (Hkv, R, G, T, D) — R sequences, T query rows each, G query heads per K/V head.
    k, v: (Hkv, R, S, D) with S a multiple of KEY_BLOCK (any strides).
    bias: (R, T, S) fp32, 0 where a row may attend and -inf elsewhere; every row must see a key.
    Returns (Hkv, R, G, T, D): fp32, or v's dtype when S is one key block (the exact same values).
    """
    hkv, r, g, t, d = q.shape
    s_len = k.shape[2]
    if s_len % KEY_BLOCK:
        raise ValueError(f"key length {s_len} is not a multiple of {KEY_BLOCK}")
    nb, b = s_len // KEY_BLOCK, hkv * r
    tp = t
    if q.dtype == torch.float32 and (g * t) % 4:  # MKL's fp32 matmul is row-stable for 4k rows only
        while (g * tp) % 4:
            tp += 1
        q = torch.cat([q, q.new_zeros(hkv, r, g, tp - t, d)], 3)
        bias = torch.cat([bias, bias[:, :1].expand(r, tp - t, s_len)], 1)
    m = g * tp
    scores = torch.matmul(q.reshape(b, m, d), k.reshape(b, s_len, d).transpose(1, 2))  # (B, M, S)
    # one fp32 op: bias + scale · scores (the fp32 upcast of the scores is exact)
    scores = torch.add(bias[None, :, None], scores.view(hkv, r, g, tp, s_len), alpha=d ** -0.5)
    p = torch.softmax(scores, -1).to(v.dtype).view(b, m, nb, KEY_BLOCK).transpose(1, 2)  # (B, nb, M, KB)
    o = torch.matmul(p, v.reshape(b, nb, KEY_BLOCK, d))  # (B, nb, M, D): per-block partials
    # one block: its partial is the output (in v's dtype; an fp32 copy would add nothing)
    o = _tree_sum(o.float()) if nb > 1 else o[:, 0]
    return o.view(hkv, r, g, tp, d)[:, :, :, :t]


def prefix_window_bias(prefix: torch.Tensor, window: torch.Tensor, s_len: int) -> torch.Tensor:
    """Additive mask (R, T, S) for R sequences that each append a window to a cached prefix.

    prefix: (R,) int, committed keys of each sequence (keys [0, prefix) are visible to every row).
    window: (R, T, W) bool, which of the sequence's own new slots (keys prefix + 0..W-1) each row sees.
    Keys past prefix + W are padding and never visible."""
    r, t, w = window.shape
    rel = torch.arange(s_len, device=window.device)[None, :] - prefix[:, None]  # (R, S)
    seen = window.gather(2, rel.clamp(0, w - 1)[:, None, :].expand(r, t, s_len))  # (R, T, S)
    vis = (rel < 0)[:, None, :] | (seen & (rel < w)[:, None, :])
    zero = torch.zeros((), dtype=torch.float32, device=window.device)
    return torch.where(vis, zero, torch.tensor(float("-inf"), device=window.device))
