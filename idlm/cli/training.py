"""`idlm convert`, `idlm export` and `idlm data generate|prompts|vocab`: making and moving drafters."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, opt
from ..data.selfdistill import DataGenConfig
from ..train.config import ConvertConfig


def cmd_convert(cfg: ConvertConfig) -> int:
    from ..train.loop import run_convert

    res = run_convert(cfg)
    if res.is_main:
        print(json.dumps({"out": str(res.out_dir), "steps": res.steps, "last_loss": round(res.last_loss, 4),
                          "log": str(res.log_path)}))
    return 0


@dataclass(frozen=True)
class ExportArgs:
    """Write an `idlm convert --mode full` model for another serving engine and print its launch command.
    vllm: a plain HF folder with mask_token_id that vLLM runs as a parallel-drafting draft model for the base
    model (tensor/pipeline parallel, multi-node; output verified by vLLM's rejection sampler, so it stays the
    base model's). sglang-idlm: the reference I-DLM layout (SDARForCausalLM config, MASK 151669, IDLMBlockN
    YAML) for the authors' SGLang fork; Qwen3 only. The gated R-ISD adapter (--mode lora) runs only in
    `idlm serve`."""

    out: str = opt(positional=True, required=True)  # output folder (created)
    to: str = opt(choices=("vllm", "sglang-idlm"), required=True)  # target engine
    model: str = opt(metavar="FOLDER", required=True)  # the `idlm convert --mode full` output folder
    stride: int | None = None  # ISD stride N (default: the one the model was trained for); vllm:
    #   num_speculative_tokens = N; sglang-idlm: gen_block_size = N, block_size = 2N-1
    mask_id: int | None = None  # vllm, for a model whose MASK is an appended row (vocabularies without spare
    #   rows, e.g. Llama/SmolLM2): an existing token id whose embedding row carries the MASK row
    temperature: float = 1.0  # sglang-idlm: the YAML's sampling temperature (<= 0 = greedy; 1.0 as the
    #   reference's YAMLs)


def cmd_export(a: ExportArgs) -> int:
    from ..interop import ExportError, export_for

    try:
        res = export_for(a.to, a.model, a.out, stride=a.stride, mask_id=a.mask_id, temperature=a.temperature)
    except ExportError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {res.out}: {', '.join(res.files)}")
    for note in res.notes:
        print(f"  note: {note}")
    print(f"launch:\n  {res.command}")
    print(json.dumps({"to": res.target, "out": str(res.out), "command": res.command}))
    return 0


def cmd_data_generate(cfg: DataGenConfig) -> int:
    from ..data.selfdistill import run_data_generate

    res = run_data_generate(cfg)
    print(f"{res.out_path}: {res.generated} new records, {res.skipped} already there, {res.response_tokens} tokens")
    return 0


@dataclass(frozen=True)
class VocabArgs:
    """Count the response tokens of JSONL training data (as `idlm data generate` writes it) and write
    draft_vocab.json: token ids by frequency and the default K that --draft-vocab auto uses. Put it in a
    converted model's or adapter's folder."""

    data: tuple[str, ...] = opt(positional=True, required=True)  # JSONL files (prompt_ids/response_ids, or text
    #   records with --model)
    out: str = opt(required=True)  # output file (name it draft_vocab.json inside the model folder)
    default_k: int = 4096  # K for --draft-vocab auto
    model: str | None = None  # tokenizer for text records (default: the embedded base)


def cmd_data_vocab(a: VocabArgs) -> int:
    from types import SimpleNamespace

    from ..data.records import LazyTokenizer, load_samples
    from ..model.draftvocab import count_tokens, write_ranking
    from ..model.loading import DEFAULT_MODEL, read_config, resolve_folder

    if a.default_k < 1:
        raise ConfigError("--default-k must be >= 1", "default_k")

    def tokenizer():  # loaded only if a file holds text records
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(resolve_folder(a.model or DEFAULT_MODEL)))

    samples = load_samples(a.data, LazyTokenizer(SimpleNamespace(tokenizer=tokenizer)))
    counts = count_tokens(s.response_ids for s in samples)
    vocab = int(read_config(resolve_folder(a.model or DEFAULT_MODEL)).get("vocab_size", 0))
    meta = write_ranking(Path(a.out), counts, a.default_k, [str(Path(p).name) for p in a.data], vocab)
    print(f"{a.out}: {meta['distinct']} distinct tokens of {meta['tokens_counted']} in {len(samples)} responses; "
          f"the {meta['default_k']} most frequent cover {meta['coverage_at_default_k']:.2%}")
    return 0


@dataclass(frozen=True)
class PromptsArgs:
    """Feed the chat template up to an open user turn to the base model and keep what it writes as prompts
    (JSONL {"prompt"}, a source for `idlm data generate`). Fragments and duplicates are dropped; each prompt is
    a function of (seed, index), so an interrupted run resumes where it stopped."""

    out: str = opt(required=True)  # output JSONL (appended to until it holds --count prompts)
    count: int = opt(required=True)  # prompts the file should hold
    model: str | None = None  # base model; default: the embedded SmolLM2-135M-Instruct
    seed: int = 0  # sampling seed
    batch_size: int = 16  # requests the engine keeps in flight
    max_tokens: int = 96  # length cap of one sampled prompt; longer ones are dropped
    temperature: float = 1.0  # sampling temperature
    top_p: float = 0.95  # nucleus sampling
    progress: bool = True  # progress bar


def cmd_data_prompts(a: PromptsArgs) -> int:
    from ..data.magpie import synthesize_prompts

    if a.count < 1 or a.batch_size < 1 or a.max_tokens < 1:
        raise ConfigError("--count, --batch-size and --max-tokens must be >= 1")
    if a.temperature <= 0 or not 0 < a.top_p <= 1:
        raise ConfigError("--temperature must be > 0 and --top-p in (0, 1]")
    res = synthesize_prompts(a.out, a.count, a.model, a.seed, a.batch_size, a.max_tokens, a.temperature, a.top_p,
                             a.progress)
    print(f"{res.out_path}: {res.written} new prompts ({res.sampled} sampled), {res.total} in the file")
    if res.exhausted:
        print(f"idlm: warning: stopped after {res.sampled} samples with {res.total} of {a.count} prompts: the model "
              "rarely ends a user turn (try a lower --temperature or a larger --max-tokens)", file=sys.stderr)
        return 1
    return 0
