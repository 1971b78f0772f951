"""The load-time row-stability check: every kernel path of a model's inference, tried on the model's own
shapes, each row of a batch against the same row computed alone (``torch.equal``).

Greedy ISD equals greedy AR, and a request's tokens do not depend on its batch, only if each row's result
is the same whatever else shares the call. idlm's native kernels have that property by construction (their
reduction order is written in their source); PyTorch's kernels, which run where the native code cannot be
built, have it or not depending on the CPU (oneDNN / MKL choose their blocking by shape and instruction
set). So every model loaded for inference on the CPU goes through ``check``:

* each distinct projection kind (its kernel and shape: q|k|v, o, gate|up, down, and a gated adapter's
  A / B path), the output head, the Python forward's attention and, where it runs, the native forward as
  a whole (a prompt in one forward against token by token);
* row counts 1..17 (every ISD window) and 2^k - 1, 2^k, 2^k + 1 up to ``max_rows`` (batches and prompt
  chunks);
* a path that rounds any row differently is switched to one row per call (``by_row``; the native forward:
  the Python forward) and checked again. It is never used as it was, and the report names it.

Columns of idlm's kernels are computed independently (one thread per block of output columns, the same
code for each), so the head, the widest layer, is checked on its first ``HEAD_COLUMNS`` columns there; a
PyTorch head is checked whole, on fewer rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import kernels, native

HEAD_COLUMNS = 2048
MAX_ROWS = 512  # the engine's default token budget per forward (prompt chunks)
HEAD_ROWS = 160  # the head scores only the rows whose logits are read: windows (16 requests x 9 rows)


def row_counts(max_rows: int) -> list[int]:
    """1..17 (every ISD window), 2^k + 1 (k >= 5: a full tile of any power-of-two blocking plus a remainder)
    up to ``max_rows``, and ``max_rows``."""
    counts = set(range(1, min(17, max_rows) + 1))
    k = 32
    while k + 1 <= max_rows:
        counts.add(k + 1)
        k *= 2
    counts.add(max_rows)
    return sorted(counts)


@dataclass
class PathResult:
    """One kernel path: what it is, whether it kept every row exact as built, and what runs now."""

    name: str  # "qkv", "head", "attention", "native forward", ...
    kernel: str  # e.g. "idlm w4a8 (576 -> 960)", "pytorch F.linear fp32 (576 -> 1536)"
    max_rows: int
    stable: bool  # as built
    first_bad: int | None = None  # the smallest row count where a row differed
    fallback: str | None = None  # what runs instead ("one row per call", "python forward")

    def line(self) -> str:
        if self.stable:
            return f"{self.name}: {self.kernel}, rows exact at 1..{self.max_rows}"
        return (f"{self.name}: {self.kernel} rounded a row differently in a batch of {self.first_bad}; "
                f"runs {self.fallback} (checked)")


@dataclass
class RowCheck:
    results: list[PathResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def all_stable(self) -> bool:
        return all(r.stable for r in self.results)

    def summary(self) -> str:
        """The one-line load report."""
        bad = [r for r in self.results if not r.stable]
        head = f"rows exact: {len(self.results)} kernel paths checked in {self.seconds:.2f} s"
        if not bad:
            return head + " (" + ("idlm kernels, " + native.isa() if native.load() else "pytorch kernels") + ")"
        return head + "; " + "; ".join(f"{r.name}: {r.kernel} unstable at {r.first_bad} rows -> {r.fallback}"
                                       for r in bad)


def first_unstable(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, counts: list[int]) -> int | None:
    """The smallest row count m in ``counts`` where some row of ``fn(x[:m])`` differs from that row alone,
    or None. Rows compared: the first four, the middle and the last two of each batch."""
    alone: dict[int, torch.Tensor] = {}

    def single(i: int) -> torch.Tensor:
        if i not in alone:
            alone[i] = fn(x[i:i + 1])[0]
        return alone[i]

    for m in counts:
        y = fn(x[:m])
        for i in sorted({0, 1, 2, 3, m // 2, m - 2, m - 1}):
            if 0 <= i < m and not torch.equal(y[i], single(i)):
                return m
    return None


def _activations(rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g).to(dtype)


def _kernel_name(proj) -> str:
    quant = proj._modules.get("quant")
    if quant is not None:
        return (f"{'idlm' if quant.fmt == 'idlm' else 'pytorch'} {quant.kind}"
                f"{' int8-activations' if quant.act == 'int8' else ''}")
    impl = "idlm" if kernels.native_enabled() else "pytorch"
    return f"{impl} dense {str(proj.weight.dtype).removeprefix('torch.')}"


def _signature(proj) -> tuple:
    quant = proj._modules.get("quant")
    kind = (quant.fmt, quant.kind, quant.act) if quant is not None else ("dense", str(proj.weight.dtype))
    return (type(proj).__name__, proj.in_features, proj.out_features, kind, getattr(proj, "rank", 0))


def _set_by_row(proj) -> None:
    proj.by_row = True
    for name in ("quant", "lora_b_quant"):
        mod = proj._modules.get(name)
        if mod is not None:
            mod.by_row = True


def _check_projections(model, counts: list[int], results: list[PathResult]) -> bool:
    """One of each distinct projection; a failing kind runs by row in every layer. True if all were stable."""
    seen: dict[tuple, list] = {}
    for layer in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            proj = getattr(layer, name)
            seen.setdefault(_signature(proj) + (name,), []).append(proj)
    ok = True
    dtype = model.dtype
    for sig, projs in seen.items():
        name, proj = sig[-1], projs[0]
        x = _activations(counts[-1], proj.in_features, dtype, seed=len(results))
        if hasattr(proj, "lora_A"):  # the gated path: the base kernel (with A's columns where fused) and B
            paths = [(f"{name} + adapter", lambda t, p=proj: p(t, torch.ones(t.shape[0], 1, dtype=t.dtype)))]
        else:
            paths = [(name, lambda t, p=proj: p(t))]
        for label, fn in paths:
            desc = f"{_kernel_name(proj)} ({proj.in_features} -> {proj.out_features})"
            bad = first_unstable(fn, x, counts)
            if bad is None:
                results.append(PathResult(label, desc, counts[-1], True))
                continue
            ok = False
            for p in projs:
                _set_by_row(p)
            if first_unstable(fn, x, counts) is not None:  # one row per call cannot differ; a broken kernel can
                raise RuntimeError(f"{label}: {desc} differs even one row per call")
            results.append(PathResult(label, desc, counts[-1], False, bad, "one row per call"))
    return ok


def _check_head(model, counts: list[int], results: list[PathResult]) -> bool:
    counts = [c for c in counts if c <= HEAD_ROWS] + ([HEAD_ROWS] if counts[-1] > HEAD_ROWS else [])
    hq = model.head_quant
    hidden = model.cfg.hidden_size
    if hq is not None and hq.fmt == "idlm" and not hq.by_row:
        cols = min(HEAD_COLUMNS, hq.out_features)

        def fn(t: torch.Tensor) -> torch.Tensor:
            return native.ops().wmm(t.to(torch.bfloat16), hq.packed, hq.scales, hq.code, cols, hq.qbias)
        desc = f"idlm {hq.kind}{' int8-activations' if hq.act == 'int8' else ''} ({hidden} -> {hq.out_features})"
    elif hq is None and kernels.native_enabled():
        w = model.head_weight()[:HEAD_COLUMNS]

        def fn(t: torch.Tensor) -> torch.Tensor:
            return kernels.linear(t, w, None, model.head_by_row)
        desc = f"idlm dense {str(w.dtype).removeprefix('torch.')} ({hidden} -> {model.cfg.vocab_size})"
    else:  # PyTorch's kernels: the whole head, fewer rows
        counts = [c for c in counts if c <= 65]

        def fn(t: torch.Tensor) -> torch.Tensor:
            return model.logits(t)
        desc = f"{'pytorch ' + hq.kind if hq is not None else 'pytorch dense'} ({hidden} -> {model.cfg.vocab_size})"
    x = _activations(counts[-1], hidden, model.dtype, seed=101)
    bad = first_unstable(fn, x, counts)
    if bad is None and model.draft_vocab is not None:  # MASK rows' head over the draft vocabulary
        bad = first_unstable(model._draft_head, x, counts)
        desc += f", draft head ({len(model.draft_vocab)} tokens)"
    if bad is None:
        results.append(PathResult("head", desc, counts[-1], True))
        return True
    model.head_by_row = True
    if hq is not None:
        hq.by_row = True
    if first_unstable(lambda t: model.logits(t), x, counts) is not None or (
            model.draft_vocab is not None and first_unstable(model._draft_head, x, counts) is not None):
        raise RuntimeError(f"head: {desc} differs even one row per call")
    results.append(PathResult("head", desc, counts[-1], False, bad, "one row per call"))
    return False


def _check_attention(model, counts: list[int], results: list[PathResult]) -> bool:
    """The Python forward's attention: query rows 0..m-1 of one sequence after a prefix, causal, against each
    row alone (its own keys only)."""
    from .attention import padded_keys, prefix_window_bias

    cfg = model.cfg
    hkv, grp, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    prefix, t_max = 37, min(counts[-1], 256)
    counts = [c for c in counts if c <= t_max]
    s = padded_keys(prefix + t_max)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(hkv, 1, grp, t_max, d, generator=g).to(model.dtype)
    k, v = (torch.randn(hkv, 1, s, d, generator=g).to(model.dtype) for _ in range(2))

    def run(rows: torch.Tensor, start: int) -> torch.Tensor:
        m = rows.shape[0]
        win = torch.ones(1, m, m, dtype=torch.bool).tril()
        bias = prefix_window_bias(torch.tensor([start]), win, s)
        return kernels.attend(q[:, :, :, rows], k, v, bias, model.attn_by_row)[:, 0].permute(2, 0, 1, 3)

    def fn(idx: torch.Tensor) -> torch.Tensor:  # rows idx[0].. of the window, as one call
        return run(idx, prefix + int(idx[0]))

    # "alone" for row i is a one-row window at prefix + i whose keys are the prefix and rows < i: the same
    # keys row i sees in the batch (the window's own earlier slots hold the same K/V)
    idx = torch.arange(t_max)
    impl = "idlm" if kernels.native_enabled() else "pytorch"
    desc = f"{impl} attention ({hkv} K/V heads x {grp}, head dim {d})"
    bad = first_unstable(fn, idx, counts)
    if bad is None:
        results.append(PathResult("attention", desc, counts[-1], True))
        return True
    model.attn_by_row = True
    if first_unstable(fn, idx, counts) is not None:
        raise RuntimeError(f"attention: {desc} differs even one row per call")
    results.append(PathResult("attention", desc, counts[-1], False, bad, "one query row per call"))
    return False


def _check_native_forward(model, results: list[PathResult], n: int = 9) -> None:
    """The native forward as a whole: n tokens in one forward against the same n one at a time (final
    hidden rows, ``torch.equal``)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=g)
    pos = torch.arange(n)
    whole = model.hidden(ids, pos, model.new_cache(capacity=n + 16))[0]
    cache = model.new_cache(capacity=n + 16)
    steps = torch.cat([model.hidden(ids[i:i + 1], pos[i:i + 1], cache)[0] for i in range(n)])
    desc = f"native ({native.isa()})"
    bad = None
    for i in range(n):
        if not torch.equal(whole[i], steps[i]):
            bad = n
            break
    if bad is None:
        results.append(PathResult("native forward", desc, n, True))
        return
    model.use_native(False)
    results.append(PathResult("native forward", desc, n, False, bad, "the python forward"))


@torch.inference_mode()
def check(model, max_rows: int = MAX_ROWS) -> RowCheck:
    """Check every inference path of ``model`` (on the CPU) and switch those that fail; see the module doc."""
    t0 = time.perf_counter()
    out = RowCheck()
    if model.embed.weight.device.type != "cpu":
        return out
    counts = row_counts(max_rows)
    stable = _check_projections(model, counts, out.results)
    stable &= _check_head(model, counts, out.results)
    if model.runs_native and not stable:  # a kernel the plan uses failed: the Python forward runs it by row
        model.use_native(False)
        out.results.append(PathResult("native forward", f"native ({native.isa()})", 0, False, 0,
                                      "the python forward (a kernel it uses failed)"))
    if model.runs_native:
        _check_native_forward(model, out.results)
    _check_attention(model, counts, out.results)  # the Python forward's (also batched caches, masks)
    out.seconds = time.perf_counter() - t0
    return out
