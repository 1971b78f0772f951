"""Prompt sources, self-distillation generation (resume) and reading samples back."""

from __future__ import annotations

import json
import shutil

import pytest

from idlm.data.prompts import BUILTIN_PROMPTS
from idlm.data.records import gsm8k_train_path, load_samples
from idlm.data.selfdistill import generate_data, load_prompts


def test_builtin_and_user_prompts(tmp_path):
    assert len(BUILTIN_PROMPTS) >= 100
    user = tmp_path / "mine.jsonl"
    user.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hello?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "old answer"}]},
        {"question": "2+2?"},
        {"prompt": "Hello?"},  # duplicate: dropped
    ]) + "\n")
    items = load_prompts(["builtin", str(user)])
    assert len(items) == len(BUILTIN_PROMPTS) + 3
    mine = [it for it in items if it.source == str(user)]
    assert mine[1].messages == (("system", "Be brief."), ("user", "Hi"))  # assistant turn dropped
    assert mine[2].messages == (("user", "2+2?"),)


def test_gsm8k_train_split_only(tmp_path):
    if gsm8k_train_path().exists():
        items = load_prompts(["gsm8k"])
        assert len(items) > 1000 and all(it.source == "gsm8k" for it in items[:5])
    bad = tmp_path / "gsm8k" / "test.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="never train"):
        load_prompts([str(bad)])
    with pytest.raises(ValueError, match="never train"):
        load_samples([str(bad)])


@pytest.fixture(scope="module")
def tiny_chat_folder(tmp_path_factory):
    """A tiny random Llama with the default model's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from idlm.model.loading import DEFAULT_MODEL, ModelLoadError, resolve_folder

    try:
        src = resolve_folder(DEFAULT_MODEL)  # the base model folder (holds the tokenizer)
    except ModelLoadError as e:
        pytest.skip(f"default model unavailable: {e}")
    out = tmp_path_factory.mktemp("tinychat")
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=64, vocab_size=49152, eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(conf).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return out


def test_generate_appends_and_resumes(tiny_chat_folder, tmp_path):
    prompts = load_prompts(["builtin"])
    out = tmp_path / "gen.jsonl"
    r1 = generate_data(prompts, out, max_new_tokens=4, limit=3, batch_size=2, model=str(tiny_chat_folder),
                       progress=False)
    assert (r1.generated, r1.skipped) == (3, 0)
    r2 = generate_data(prompts, out, max_new_tokens=4, limit=5, batch_size=2, model=str(tiny_chat_folder),
                       progress=False)
    assert (r2.generated, r2.skipped) == (2, 3)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 5 and len({r["key"] for r in recs}) == 5
    for r in recs:
        assert 1 <= len(r["response_ids"]) <= 4 and r["finish"] in ("stop", "length")
        assert r["messages"][-1]["role"] == "user" and r["response"] is not None
    samples = load_samples([str(out)])
    assert len(samples) == 5 and samples[0].prompt_ids == tuple(recs[0]["prompt_ids"])


def test_text_records_are_tokenized_with_the_chat_template(tiny_chat_folder, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_chat_folder))
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "response": "Hello there."}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Q"},
                                               {"role": "assistant", "content": "A."}]}) + "\n")
    a, b = load_samples([str(path)], tok)
    assert tok.decode(a.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(a.response_ids) == "Hello there.<|im_end|>"
    assert tok.decode(b.response_ids) == "A.<|im_end|>"


def test_magpie_prefix_and_cleaning(tiny_chat_folder):
    from transformers import AutoTokenizer

    from idlm.data.magpie import clean_prompt, user_prefix

    tok = AutoTokenizer.from_pretrained(str(tiny_chat_folder))
    prefix = user_prefix(tok)
    assert prefix.endswith("<|im_start|>user\n")  # SmolLM2's template, its default system turn before it
    full = tok.apply_chat_template([{"role": "user", "content": "Hi there you"}], tokenize=False)
    assert full.startswith(prefix + "Hi there you")
    assert clean_prompt("  How do tides work on Earth?\n") == "How do tides work on Earth?"
    assert clean_prompt("Too short") is None and clean_prompt("x " * 400) is None
    assert clean_prompt("Tell me a story <|im_end|> please") is None


@pytest.mark.slow  # ~90 s on the 2-core CI machine
def test_magpie_prompts_are_deterministic_and_resume(tmp_path):
    """The real default model samples user turns; a second call appends until --count, and the prompts
    are a function of (seed, index): a fresh file with the same seed holds the same ones."""
    from idlm.data.magpie import synthesize_prompts
    from idlm.model.loading import DEFAULT_MODEL, ModelLoadError, resolve_folder

    try:
        resolve_folder(DEFAULT_MODEL)
    except ModelLoadError as e:
        pytest.skip(f"default model unavailable: {e}")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    r1 = synthesize_prompts(a, 2, batch_size=4, max_tokens=64, progress=False)
    r2 = synthesize_prompts(a, 4, batch_size=4, max_tokens=64, progress=False)
    assert (r1.total, r2.total, r2.written) == (2, 4, 2) and not r2.exhausted
    recs = [json.loads(x) for x in a.read_text().splitlines()]
    assert len({r["prompt"].lower() for r in recs}) == 4
    assert all(len(r["prompt"].split()) >= 4 for r in recs)
    synthesize_prompts(b, 4, batch_size=4, max_tokens=64, progress=False)
    assert [json.loads(x) for x in b.read_text().splitlines()] == recs  # resumed == uninterrupted
    assert synthesize_prompts(a, 4, progress=False).sampled == 0  # already full: nothing sampled
    assert load_prompts([str(a)])[0].messages == (("user", recs[0]["prompt"]),)
