"""The engine serves many requests in one batch, and each one decodes exactly as it would alone.

The oracle is the batch-1 decoder (``isd_generate`` / ``ar_generate``): every output is compared
token for token. Models are tiny random decoders with an 8-token vocabulary, so drafts are
accepted often enough for accept, reject and fallback paths to all run.
"""

from __future__ import annotations

import pytest
import torch

from idlm.config import ConfigError, DecodeConfig, SamplingParams
from idlm.decode import ar_generate, isd_generate
from idlm.engine import CostModel, EngineConfig, LLMEngine

from ..decode.tiny import tiny_model, tiny_risd_pair

GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
FLAT_COST = CostModel([1, 1000], [0.01, 0.0100001])  # rows are free: the policy drafts as much as it can
MIXED = [DecodeConfig(mode="ar")] + [DecodeConfig(stride=n, fallback=fb) for n in (2, 3, 4, 5)
                                     for fb in (True, False, "auto")] + [DecodeConfig(stride="auto")] \
    + [DecodeConfig(stride=3, fallback=True, tree=2), DecodeConfig(stride=4, fallback=False, tree=3)]


def engine(model, cost: CostModel = FLAT_COST, **kw) -> LLMEngine:
    kw.setdefault("num_blocks", 512)
    kw.setdefault("block_size", 4)
    return LLMEngine(model, EngineConfig(**kw), cost=cost)


def alone(model, prompt: list[int], cfg: DecodeConfig, params: SamplingParams) -> list[int]:
    """The batch-1 oracle (auto stride and greedy: AR, which every stride reproduces)."""
    if cfg.mode == "ar" or (cfg.auto and params.greedy):
        return ar_generate(model, prompt, params, sampling_mode=cfg.sampling_mode).tokens
    return isd_generate(model, prompt, cfg, params).tokens


def prompts(n: int, seed: int = 0, vocab: int = 7, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run(eng: LLMEngine, items: list[tuple[list[int], SamplingParams, DecodeConfig]], late: int = 0
        ) -> dict[str, list[int]]:
    """Add the first len(items) - late requests, step twice, add the rest, run to the end."""
    ids = [eng.add_request(p, sp, dc) for p, sp, dc in items[: len(items) - late]]
    for _ in range(2):
        eng.step()
    ids += [eng.add_request(p, sp, dc) for p, sp, dc in items[len(items) - late:]]
    while eng.has_unfinished():
        eng.step()
    return {i: eng.completion(i).token_ids for i in ids}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_equals_each_request_alone(dtype: torch.dtype) -> None:
    """16 prompts of mixed lengths with AR, ISD N=2..5 (fallback on / off / auto) and auto stride in
    one engine, 6 of them arriving mid-flight, prompts chunked by a small token budget."""
    model = tiny_model(seed=5, vocab=8).to(dtype)
    ps = prompts(16)
    items = [(p, GREEDY, MIXED[i % len(MIXED)]) for i, p in enumerate(ps)]
    eng = engine(model, max_running=16, max_batched_tokens=48)
    got = run(eng, items, late=6)
    for (p, sp, dc), out in zip(items, got.values()):
        assert out == alone(model, p, dc, sp), dc
    m = eng.metrics
    assert sum(m.accepted_at) > 20 and m.verify_steps > 100  # drafts were accepted and rejected for real
    assert m.generation_tokens == 16 * 24 and m.running == m.waiting == m.kv_blocks_used == 0
    eng.blocks.check()
    assert eng.blocks.num_free == eng.blocks.num_total


@pytest.mark.parametrize("mode", ["exact", "coupled"])
def test_seeded_sampled_request_same_alone_and_in_a_batch_of_8(mode: str) -> None:
    model = tiny_model(seed=6, vocab=8)
    cfg = DecodeConfig(stride=3, sampling_mode=mode)
    mine = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=30, ignore_eos=True)
    p = [3, 1, 4, 1, 5]
    solo = run(engine(model, max_running=1), [(p, mine, cfg)])
    others = [(q, SamplingParams(temperature=0.9, seed=100 + i, max_new_tokens=30, ignore_eos=True),
               MIXED[i % len(MIXED)]) for i, q in enumerate(prompts(7, seed=1))]
    want = isd_generate(model, p, cfg, mine).tokens
    assert next(iter(solo.values())) == want
    # whatever the load makes the window policy choose for the others (drafts free / drafts ruinous)
    for cost in (FLAT_COST, CostModel([1, 1000], [0.01, 10.0])):
        batch = run(engine(model, cost=cost, max_running=8), others[:3] + [(p, mine, cfg)] + others[3:], late=4)
        assert list(batch.values())[3] == want


def test_coupled_sampling_same_with_auto_stride_and_ar() -> None:
    """Coupled randomness is keyed by output index: a seeded request gives the same tokens whatever
    stride the load picks, and the same as coupled AR."""
    model = tiny_model(seed=6, vocab=8)
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=40, ignore_eos=True)
    p = [2, 7, 1, 6]
    ar = ar_generate(model, p, params, sampling_mode="coupled").tokens
    for cost in (FLAT_COST, CostModel([1, 1000], [0.01, 10.0])):  # drafts free / drafts ruinous
        eng = engine(model, cost=cost, max_running=4)
        got = run(eng, [(p, params, DecodeConfig(stride="auto", sampling_mode="coupled"))] +
                  [(q, GREEDY, DecodeConfig(stride="auto")) for q in prompts(3, seed=2)])
        assert next(iter(got.values())) == ar


def test_abort_mid_generation_frees_every_block_at_once() -> None:
    model = tiny_model(seed=7, vocab=8)
    eng = engine(model, max_running=4)
    a = eng.add_request([1, 2, 3, 4, 5, 6], SamplingParams(max_new_tokens=50, ignore_eos=True))
    b = eng.add_request([6, 5, 4], GREEDY, DecodeConfig(stride=4))
    for _ in range(4):
        eng.step()
    assert eng.blocks.table(a) and len(eng.requests[a].output) > 0
    used = eng.blocks.num_used
    assert eng.abort(a) and not eng.abort(a)
    assert eng.blocks.table(a) == [] and eng.blocks.num_used < used  # freed now, not at the next step
    assert eng.requests[a].state is None and eng.requests[a].noise is None
    outs = eng.step()
    assert any(o.request_id == a and o.finished and o.finish_reason == "abort" for o in outs)
    while eng.has_unfinished():
        eng.step()
    assert eng.completion(b).token_ids == alone(model, [6, 5, 4], DecodeConfig(stride=4), GREEDY)
    assert eng.blocks.num_free == eng.blocks.num_total and eng.metrics.finished == {"abort": 1, "length": 1}


def test_pool_too_small_preempts_the_newest_and_outputs_are_unchanged() -> None:
    """Six requests that cannot all hold their KV at once: the newest is preempted (blocks freed,
    recomputed later, decoder state and random sources kept) and every output, greedy or seeded, is
    what it is without preemption."""
    model = tiny_model(seed=8, vocab=8)
    sampled = SamplingParams(temperature=1.0, seed=11, max_new_tokens=40, ignore_eos=True)
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    items = [(p, sampled if i % 3 == 0 else long, MIXED[(2 * i + 1) % len(MIXED)])
             for i, p in enumerate(prompts(6, seed=3, longest=30))]
    eng = engine(model, num_blocks=40, max_running=6)  # 39 usable blocks of 4 = 156 slots for ~6 x 60
    got = run(eng, items)
    assert eng.metrics.preemptions > 0 and eng.metrics.recomputed_tokens > 0
    for (p, sp, dc), out in zip(items, got.values()):
        assert out == alone(model, p, dc, sp)
    eng.blocks.check()
    assert eng.blocks.num_free == eng.blocks.num_total


def test_long_prompt_is_chunked_without_stalling_or_changing_the_others() -> None:
    model = tiny_model(seed=9, vocab=8)
    eng = engine(model, num_blocks=700, max_running=4, max_batched_tokens=64)
    short = [(p, SamplingParams(max_new_tokens=120, ignore_eos=True), DecodeConfig(stride=3, fallback=True))
             for p in prompts(3, seed=4, longest=10)]
    ids = [eng.add_request(*it) for it in short]
    for _ in range(3):
        eng.step()
    big = torch.randint(0, 7, (2000,), generator=torch.Generator().manual_seed(5)).tolist()
    rid = eng.add_request(big, SamplingParams(max_new_tokens=8, ignore_eos=True), DecodeConfig(stride=2))
    chunks, overlapped = 0, 0
    while eng.requests[rid].num_computed < len(big):
        live = {i for i in ids if eng.requests[i].finish_reason is None}
        outs = eng.step()
        chunks += 1
        emitted = {o.request_id for o in outs if o.new_token_ids}
        assert live <= emitted, "a decoding request stalled during the long prefill"
        overlapped += bool(live)
    assert chunks > 20 and overlapped > 20  # 2,000 tokens in many chunks, decoders emitting between them
    while eng.has_unfinished():
        eng.step()
    for i, (p, sp, dc) in zip(ids, short):
        assert eng.completion(i).token_ids == alone(model, p, dc, sp)
    assert eng.completion(rid).token_ids == alone(model, big, DecodeConfig(stride=2),
                                                  SamplingParams(max_new_tokens=8, ignore_eos=True))


BAD = [
    (lambda: ([], SamplingParams(), DecodeConfig()), "prompt"),
    (lambda: ([1] * 300, SamplingParams(), DecodeConfig()), "prompt"),  # longer than the context
    (lambda: ([1] * 100, SamplingParams(max_new_tokens=200), DecodeConfig()), "max_new_tokens"),
    (lambda: ([1, 99], SamplingParams(), DecodeConfig()), "prompt"),  # token id out of the vocabulary
    (lambda: ([1], SamplingParams(), DecodeConfig(stride=9)), "stride"),
    (lambda: ([1], SamplingParams(), DecodeConfig(stride=1)), "stride"),
    (lambda: ([1], SamplingParams(), DecodeConfig(stride="fast")), "stride"),
    (lambda: ([1], SamplingParams(max_new_tokens=0), DecodeConfig()), "max_new_tokens"),
    (lambda: ([1], SamplingParams(temperature=float("nan")), DecodeConfig()), "temperature"),
    (lambda: ([1], SamplingParams(top_p=0.0), DecodeConfig()), "top_p"),
]


@pytest.mark.parametrize("make, field", BAD)
def test_bad_input_is_a_typed_error_naming_the_field_and_the_rest_is_served(make, field: str) -> None:
    model = tiny_model(seed=10, vocab=8)
    eng = engine(model, max_model_len=256)
    good = eng.add_request([4, 2], GREEDY, DecodeConfig(stride=3))
    eng.step()
    with pytest.raises(ConfigError) as e:
        eng.add_request(*make())
    assert e.value.field == field and str(e.value)
    while eng.has_unfinished():
        eng.step()
    assert eng.completion(good).token_ids == alone(model, [4, 2], DecodeConfig(stride=3), GREEDY)
    assert len(eng.requests) == 1


def test_logprobs_are_the_anchor_distribution_of_each_committed_token() -> None:
    model = tiny_model(seed=12, vocab=8)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=3)
    eng = engine(model)
    rid = eng.add_request([5, 1, 2], params, DecodeConfig(stride=3))
    while eng.has_unfinished():
        eng.step()
    c = eng.completion(rid)
    assert [lp.token_id for lp in c.logprobs] == c.token_ids
    ids = torch.tensor([5, 1, 2] + c.token_ids)
    ref = torch.log_softmax(model(ids, torch.arange(len(ids)))[0, 2:-1], -1)  # clean causal forward
    for i, lp in enumerate(c.logprobs):
        assert lp.logprob == pytest.approx(float(ref[i, lp.token_id]), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy: the chosen token is the top one
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()


def test_risd_adapter_in_a_batch_keeps_each_request_the_base_models_greedy_output() -> None:
    base, adapted = tiny_risd_pair(13, vocab=8)
    adapted.requires_grad_(False)
    items = [(p, GREEDY, MIXED[i % len(MIXED)]) for i, p in enumerate(prompts(8, seed=6))]
    got = run(engine(adapted, max_running=8), items, late=3)
    for (p, sp, _), out in zip(items, got.values()):
        assert out == ar_generate(base, p, sp).tokens


def test_stationary_steps_reuse_the_batch_and_stay_exact() -> None:
    """Three requests decoding together, nothing arriving or leaving: after the first decode step
    every step is stationary (the block-table tensor is patched in place), and outputs are exact."""
    model = tiny_model(seed=14, vocab=8)
    eng = engine(model, max_running=4)
    items = [(p, SamplingParams(max_new_tokens=30, ignore_eos=True), DecodeConfig(stride=3))
             for p in prompts(3, seed=7, longest=5)]
    got = run(eng, items)
    m = eng.metrics
    assert m.stationary_steps >= m.steps - 4  # the prefill step, the first decode step, the tail
    for (p, sp, dc), out in zip(items, got.values()):
        assert out == alone(model, p, dc, sp)


def test_prompt_logprobs_are_the_causal_log_softmax_chunked_and_preempted() -> None:
    """Prompt scoring (what echo + logprobs serves): entry i is log p(prompt[i] | prompt[:i]) from
    one causal forward; the first is None. Chunked over several steps and recomputed after a
    preemption, each token is scored exactly once."""
    model = tiny_model(seed=12, vocab=8)
    prompt = torch.randint(0, 7, (70,), generator=torch.Generator().manual_seed(9)).tolist()
    with torch.inference_mode():
        ref = torch.log_softmax(model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None])[0].float(), -1)
    want = [float(ref[i - 1, t]) for i, t in enumerate(prompt) if i]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=2)
    for kw in ({"max_batched_tokens": 16}, {"max_batched_tokens": 16, "num_blocks": 24, "max_running": 3}):
        eng = engine(model, **kw)
        rid = eng.add_request(prompt, params)
        others = [eng.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in prompts(2, seed=4)]
        firsts = []
        while eng.has_unfinished():
            firsts += [o.prompt_logprobs for o in eng.step() if o.request_id == rid and o.prompt_logprobs]
        got = eng.completion(rid).prompt_logprobs
        assert got[0] is None and len(got) == len(prompt) and firsts == [got]
        assert [g.token_id for g in got[1:]] == prompt[1:]
        assert [g.logprob for g in got[1:]] == pytest.approx(want, abs=1e-4)
        assert all(len(g.top) == 2 and g.top[0][1] >= g.logprob - 1e-6 for g in got[1:])
        assert eng.completion(rid).token_ids == alone(model, prompt, DecodeConfig(), params)
        assert all(eng.completion(o).finish_reason == "length" for o in others)


def test_drafted_flags_count_the_accepted_drafts() -> None:
    model = tiny_model(seed=5, vocab=8)
    eng = engine(model, max_running=2)
    rid = eng.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=60, ignore_eos=True), DecodeConfig(stride=4))
    flags = []
    while eng.has_unfinished():
        for o in eng.step():
            assert len(o.drafted) == len(o.new_token_ids)
            assert o.finished or not o.drafted or not o.drafted[-1]  # a step ends with the anchor's own token
            flags += o.drafted
    stats = eng.completion(rid).stats
    accepted = sum(stats.accepted_at)  # the last step's tokens past max_new_tokens are dropped
    assert len(flags) == 60 and 0 < accepted - 3 <= sum(flags) <= accepted


def test_kv_capacity_and_reset_metrics_in_place() -> None:
    """The engine's public face: the pool's size in tokens, and counters zeroed in place (the window
    policy and a Prometheus collector hold the same object), the pool size kept."""
    from idlm.engine import AsyncEngine
    from idlm.metrics import EngineMetrics

    eng = engine(tiny_model(seed=1), num_blocks=64, block_size=4)
    assert eng.kv_capacity_tokens == eng.blocks.num_total * 4 == AsyncEngine(eng).kv_capacity_tokens
    held = eng.metrics
    eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, ignore_eos=True), DecodeConfig(stride=3))
    assert held.steps > 0 and held.generation_tokens == 5 and held.finished == {"length": 1}
    AsyncEngine(eng).reset_metrics()
    assert eng.metrics is held is eng.stride_policy.metrics
    assert held == EngineMetrics(kv_blocks_total=eng.blocks.num_total)
