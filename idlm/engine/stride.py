"""Load-adaptive windows: ``--stride auto`` and ``--fallback auto`` (the default).

A wider window is nearly free while the forward is memory-bound (a few rows) and costs its full
share once the batch is compute-bound (many rows): on this CPU 9 rows cost ~1.06x one row, 144 rows
~5x. So the best window shrinks with the load. Each step, for the decoding requests that left a
choice to the engine, ``WindowPolicy`` picks the N (for ``--stride auto``) and whether to add
fallback branches (for ``--fallback auto``) that maximise

    expected tokens this forward / predicted time of this forward

where the expected tokens of a request come from its measured draft acceptance (by draft position,
shrunk towards the engine-wide rate) in steady state (spec §3.8), and the time from ``CostModel``:
forward time by rows, measured on this machine. N = 1 is a plain AR step, so ``auto`` can always
fall back to AR. Neither choice changes a greedy output, nor a coupled-sampling one (its randomness
is keyed by output index).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import platform
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..config import AUTO_MAX_STRIDE, cache_dir
from ..metrics import EngineMetrics
from ..model.native import build_tag
from .request import Request

PRIOR_ACCEPT = 0.75  # acceptance assumed for a draft position never measured: optimistic, so drafts get tried
PRIOR_WEIGHT = 4.0  # pseudo-counts of that prior (engine-wide) / of the engine-wide rate (per request)
DRAFT_MARGIN = 0.15  # auto stride drafts only if that promises this much more throughput than AR: near break-even
# the prediction's error decides, and a wrong drafting step costs more than a wrong AR step
SWITCH_HORIZON = 4  # steps over which switching from AR to drafting pays back its cold first step
EXPLORE_EVERY = 64  # after this many AR choices in a row, one step drafts anyway: the only way the correction
# can learn that windows got cheaper (a row count the engine stops running is never measured again)
CORRECTION_EMA = 0.2  # weight of the newest step in the learned correction of the calibration
# every batch-1 window size (2N - 1, with fallback branches 2N - 1 + (N - 1)^2) is measured, larger batches at
# points linearly interpolated (and extrapolated past 128: a forward's cost is nearly linear in its rows there)
CALIBRATION_ROWS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 25, 32, 48, 64, 96, 128)
GATED_ROWS = (4, 16, 64)  # row counts also timed with every row gated (adapter models)
CALIBRATION_VERSION = 5  # part of the cache key: a change in how the calibration is measured re-measures


@dataclass
class CostModel:
    """Forward time (s) by the number of rows, linearly interpolated between measured points (and
    extrapolated past the last one), plus what gated (R-ISD adapter) rows add: a fixed cost once any
    row is gated (the adapter's extra matmul calls, which dominate small windows) and a cost per row."""

    rows: list[int]  # measured row counts, increasing
    seconds: list[float]  # forward + logits time at each
    gated_per_row: float = 0.0  # extra seconds per gated (MASK) row; < 0 where a MASK row is the cheaper one
    gated_fixed: float = 0.0  # extra seconds of a forward with at least one gated row

    def __post_init__(self) -> None:
        # more rows never cost less: a noisy calibration point below an earlier one is raised to it
        self.seconds = list(itertools.accumulate(self.seconds, max))

    def __call__(self, rows: int, gated: int = 0) -> float:
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows) and self.rows[i] == rows:
            base = self.seconds[i]
        else:
            i = min(max(i, 1), len(self.rows) - 1)
            r0, r1, s0, s1 = self.rows[i - 1], self.rows[i], self.seconds[i - 1], self.seconds[i]
            base = s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
        if not gated:
            return base
        return max(self.seconds[0], base + self.gated_fixed + gated * self.gated_per_row)

    @classmethod
    def for_model(cls, model) -> CostModel:
        """The calibration of this model on this machine: read from the cache folder, or measured
        (a few seconds) and saved there. The key covers the model's shapes and adapter, dtype,
        thread count, torch version and CPU, so a different setting measures again."""
        path = cache_dir() / "cost" / f"{_machine_key(model)}.json"
        try:
            d = json.loads(path.read_text())
            return cls(d["rows"], d["seconds"], d["gated_per_row"], d["gated_fixed"])
        except (OSError, ValueError, KeyError):
            pass
        cost = cls.measure(model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(cost)))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache only costs a re-measurement next time
        return cost

    @classmethod
    def measure(cls, model, prefix: int = 256, reps: int = 3, rows: tuple[int, ...] = CALIBRATION_ROWS) -> CostModel:
        """Time forwards of k new rows over a ``prefix``-token cache, each k, interleaved, the fastest of
        ``reps`` (the work is deterministic: noise only ever adds time, and a calibration point set too
        high keeps the policy from ever trying that window); and the same with every row gated when
        the model has adapters."""
        vocab = model.cfg.vocab_size
        gen = torch.Generator().manual_seed(0)
        cache = model.new_cache(capacity=prefix + max(rows) + 256)
        gated = model.has_adapters or model.draft_vocab is not None  # MASK rows cost other than clean rows
        times: dict[tuple[int, bool], list[float]] = {}
        with torch.inference_mode():
            model.hidden(torch.randint(0, vocab, (prefix,), generator=gen), torch.arange(prefix), cache)
            for rep in range(reps + 1):
                for k in rows:
                    for g in ((False, True) if gated and k in GATED_ROWS else (False,)):
                        ids = torch.randint(0, vocab, (k,), generator=gen)
                        if g:  # k MASK rows: the adapter on, the draft vocabulary's head
                            ids.fill_(model.cfg.mask_token_id)
                        t = time.perf_counter()
                        model.logits(model.hidden(ids, prefix + torch.arange(k), cache,
                                                  gate=torch.ones(k) if g and model.has_adapters else None),
                                     torch.ones(k, dtype=torch.bool) if g else None)
                        dt = time.perf_counter() - t
                        cache.crop(prefix)
                        if rep:  # the first round warms up
                            times.setdefault((k, g), []).append(dt)
        med = {key: min(v) for key, v in times.items()}
        per_gated = fixed = 0.0
        if gated:  # extra time of k MASK rows = fixed + k · per_gated: a line through the measured points;
            # per_gated < 0 where a MASK row costs less than a clean one (a draft vocabulary's smaller head)
            extra = {k: med[(k, True)] - med[(k, False)] for k in GATED_ROWS}
            lo, mid, hi = GATED_ROWS
            per_gated = (extra[hi] - extra[mid]) / (hi - mid)
            fixed = max(0.0, extra[lo] - lo * per_gated)
        return cls(list(rows), [med[(k, False)] for k in rows], per_gated, fixed)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_key(model) -> str:
    cfg = model.cfg
    parts = [cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
             cfg.vocab_size, model.has_adapters, None if model.draft_vocab is None else len(model.draft_vocab),
             str(model.dtype), getattr(model, "quant_mode", "none"),
             torch.get_num_threads(), torch.__version__, _cpu_name(), CALIBRATION_ROWS, GATED_ROWS, CALIBRATION_VERSION,
             build_tag(model)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def expected_tokens(accept: list[float], n: int, fallback: bool) -> float:
    """Steady-state tokens per forward at stride n given P(draft j accepted | checked) (spec §3.8).
    With fallback drafts every step verifies; without, a rejection costs a cold step."""
    if n <= 1:
        return 1.0
    prefix, e_acc = 1.0, 0.0
    for j in range(n - 1):
        prefix *= accept[j] if j < len(accept) else PRIOR_ACCEPT
        e_acc += prefix
    if fallback:
        return 1.0 + e_acc
    a = prefix  # all accepted
    if a >= 1.0:
        return float(n)
    e_rej = (e_acc - a * (n - 1)) / (1 - a)  # accepted drafts in a rejecting round
    return (a * n + (1 - a) * (e_rej + 2)) / (a + 2 * (1 - a))


def window_rows(n: int, fallback: bool, accept: list[float] | None = None) -> tuple[float, float]:
    """(rows, gated rows) per forward at stride n in steady state: a verify window, or without
    fallback the average over verify steps and the cold steps (n rows) that follow rejections."""
    d = n - 1
    if fallback or d == 0:
        branches = d * d if fallback else 0
        return float(2 * n - 1 + branches), float(d + branches)
    a = 1.0
    for j in range(d):
        a *= accept[j] if accept and j < len(accept) else PRIOR_ACCEPT
    rows = (a * (2 * n - 1) + (1 - a) * (2 * n - 1 + n)) / (a + 2 * (1 - a))
    return rows, float(d)


class Correction:
    """What the calibration gets wrong on this engine, learned from its own steps: a factor per
    calibrated row count (measured step time / calibrated time, an EMA), linearly interpolated.

    The calibration times one sequence over a fixed prefix; an engine step also gathers every
    request's keys, attends over its real context and runs the adapter on scattered rows, so the
    true cost differs, by an amount that changes with the load. A row count never observed takes
    the largest factor observed so far: an untried window is assumed as costly, relative to its
    calibration, as the worst one seen, so exploring wider windows under load stays rare."""

    def __init__(self, points: list[int]):
        self.points = points
        self.factors: list[float | None] = [None] * len(points)

    def _weights(self, rows: float) -> list[tuple[int, float]]:
        i = bisect.bisect_left(self.points, rows)
        if i == 0:
            return [(0, 1.0)]
        if i == len(self.points):
            return [(i - 1, 1.0)]
        lo, hi = self.points[i - 1], self.points[i]
        w = (rows - lo) / (hi - lo)
        return [(i - 1, 1.0 - w), (i, w)]

    def __call__(self, rows: float) -> float:
        seen = [f for f in self.factors if f is not None]
        base = max(seen) if seen else 1.0
        return sum(w * (base if self.factors[i] is None else self.factors[i]) for i, w in self._weights(rows))

    def update(self, rows: float, ratio: float) -> None:
        for i, w in self._weights(rows):
            f = self.factors[i] if self.factors[i] is not None else ratio
            self.factors[i] = f + CORRECTION_EMA * w * (ratio - f)


class WindowPolicy:
    """The scheduler's ``StridePolicy``: one (N, fallback) choice per step for the adaptive requests.

    Predicted step time = ``cost(rows, gated rows)`` (calibrated on one sequence) x a correction
    learned online from the engine's measured step times (``observe``): the calibration's errors
    are a few ms at the row counts where AR and ISD are close, and those decide the choice."""

    def __init__(self, model, metrics: EngineMetrics, max_stride: int = AUTO_MAX_STRIDE,
                 cost: CostModel | None = None):
        self.model, self.metrics, self.max_stride, self._cost = model, metrics, max_stride, cost
        self.chosen: Counter = Counter()  # (N of the auto-stride requests or 0, fallback) -> steps
        self._correction: Correction | None = None
        self._ar_streak = 0  # consecutive steps that chose AR over a drafting option

    @property
    def cost(self) -> CostModel:
        if self._cost is None:
            self._cost = CostModel.for_model(self.model)
        return self._cost

    @property
    def correction(self) -> Correction:
        if self._correction is None:
            self._correction = Correction(self.cost.rows)
        return self._correction

    def predict(self, rows: float, gated: float) -> float:
        """Predicted seconds of a forward of ``rows`` rows, ``gated`` of them with the adapter on."""
        return self.cost(round(rows), round(gated)) * self.correction(rows)

    def observe(self, rows: int, gated: int, seconds: float) -> None:
        """A finished forward: learn how far the calibration was off at this row count. Only once
        a policy decision has needed the calibration (no measurement for fixed-stride traffic)."""
        if self._cost is None or seconds <= 0:
            return
        self.correction.update(rows, seconds / self.cost(rows, gated))

    def acceptance(self, req: Request) -> list[float]:
        """Per draft position: the request's own rate shrunk towards the engine-wide one."""
        m, s = self.metrics, req.stats
        out = []
        for j in range(self.max_stride - 1):
            glob = (m.accepted_at[j] + PRIOR_WEIGHT * PRIOR_ACCEPT) / (m.tested_at[j] + PRIOR_WEIGHT)
            mine_a = s.accepted_at[j] if j < len(s.accepted_at) else 0
            mine_t = s.tested_at[j] if j < len(s.tested_at) else 0
            out.append((mine_a + PRIOR_WEIGHT * glob) / (mine_t + PRIOR_WEIGHT))
        return out

    def choose(self, requests: list[Request], other_rows: int) -> dict[str, tuple[int, bool]]:
        """(N - 1, fallback) by request id for ``requests`` (all adaptive); ``other_rows`` are the
        rows the rest of the batch brings (prompt chunks, fixed windows)."""
        gated = self.model.has_adapters
        accepts = [self.acceptance(r) for r in requests]
        any_auto = any(r.decode.auto for r in requests)
        rates = {}
        for n_auto in (range(1, self.max_stride + 1) if any_auto else (0,)):
            for fb in (False, True):
                tokens, rows, g = 0.0, float(other_rows), 0.0
                for a, r in zip(accepts, requests):
                    n, use_fb = self._window(r, n_auto, fb)
                    t = expected_tokens(a, n, use_fb)
                    if n > 1 and not (r.state is not None and r.state.specs):
                        # no drafts to verify yet: this step is cold and the gain starts with the next one;
                        # averaged over the steps a choice usually lasts
                        t = (1.0 + (SWITCH_HORIZON - 1) * t) / SWITCH_HORIZON
                    tokens += t
                    w, wg = window_rows(n, use_fb, a)
                    k = min(r.decode.tree, n - 1)  # tree branches (at most; their gain is not modelled)
                    w, wg = w + k * (n - 1), wg + k * (n - 2)
                    rows, g = rows + w, g + wg
                rates[(n_auto, fb)] = tokens / self.predict(rows, g if gated else 0)
        drafting = {k: v for k, v in rates.items() if k[0] != 1}
        best = max(drafting, key=drafting.get)
        if (1, False) in rates and drafting[best] <= rates[(1, False)] * (1.0 + DRAFT_MARGIN):
            # drafting must clearly beat plain AR: near break-even the prediction's error decides; but
            # every EXPLORE_EVERY steps draft once, so the step times of windows are measured again
            self._ar_streak += 1
            if self._ar_streak <= EXPLORE_EVERY:
                best = (1, False)
            else:
                self._ar_streak = 0
        else:
            self._ar_streak = 0
        self.chosen[best] += 1
        out = {}
        for r in requests:
            n, use_fb = self._window(r, *best)
            out[r.id] = (n - 1, use_fb)
        return out

    @staticmethod
    def _window(req: Request, n_auto: int, fb: bool) -> tuple[int, bool]:
        """This request's (N, fallback) under the step-wide choice (n_auto, fb)."""
        n = n_auto if req.decode.auto else req.decode.max_stride
        use_fb = (fb if req.decode.fallback == "auto" else bool(req.decode.fallback)) and n > 1
        return n, use_fb
