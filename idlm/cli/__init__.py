"""The ``idlm`` command: argv -> one typed config -> one function per subcommand.

Each subcommand's flags are the fields of one dataclass (``flags.add_flags``; help = the field's comment),
built back from argv by ``flags.from_args``; the function it runs takes that config and nothing else. Bad
input (unknown model, unsupported architecture, out-of-range settings, empty prompt) prints one
``idlm: error: ...`` line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import SERVER_ENGINE_FLAGS, ServerConfig
from ..data.selfdistill import DataGenConfig
from ..train.config import ConvertConfig
from . import bench, decoding, evaluate, serving, training
from .flags import add_flags, from_args

EXIT_USAGE = 2
GREEDY = ("sampling_mode",)  # commands that decode greedily only: no --sampling-mode
ENGINE_BENCH = {"EngineConfig": ("max_batched_tokens", "kv_cache_gb")}


@dataclass(frozen=True)
class Command:
    """One subcommand: its typed config, the function that runs it, and how its flags differ from the
    config's defaults."""

    name: str
    summary: str  # the line in `idlm --help`
    config: type  # the dataclass its flags come from (its docstring is the subcommand's --help description)
    run: Callable[[Any], int]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # flag defaults for this command
    skip: tuple[str, ...] = ()  # config fields without a flag (they keep their defaults)
    only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # nested config -> the fields it exposes


COMMANDS = (
    Command("generate", "decode one prompt with ISD or AR and print text + stats", decoding.GenerateArgs,
            decoding.cmd_generate),
    Command("verify", "check greedy ISD == greedy AR on built-in prompts", decoding.VerifyArgs, decoding.cmd_verify,
            {"dtype": "fp32"}, GREEDY),
    Command("bench", "throughput of engine AR and ISD at several concurrencies, side by side", bench.BenchArgs,
            bench.cmd_bench, only=ENGINE_BENCH),
    Command("forward-cost", "cost of a k-token window vs a 1-token forward over a cached prefix",
            bench.ForwardCostArgs, bench.cmd_forward_cost),
    Command("convert", "introspective-consistency training: base LM -> I-DLM (full) or R-ISD adapter (lora)",
            ConvertConfig, training.cmd_convert),
    Command("export", "lay out a converted model for vLLM (draft model) or the reference SGLang",
            training.ExportArgs, training.cmd_export),
    Command("eval", "quality on GSM8K / HumanEval (ISD vs AR) or held-out NLL, in process or over HTTP",
            evaluate.EvalArgs, evaluate.cmd_eval, {"dtype": None}, GREEDY, ENGINE_BENCH),
    Command("iar", "introspective acceptance rate: does the model agree with its own parallel drafts?",
            evaluate.IarArgs, evaluate.cmd_iar, {"dtype": "fp32"}),
    Command("serve", "OpenAI-compatible HTTP server (completions, chat, streaming, metrics, playground)",
            ServerConfig, serving.cmd_serve, only={"EngineConfig": SERVER_ENGINE_FLAGS}),
    Command("demo", "the quick-start job: a few chat prompts with ISD and AR side by side", decoding.DemoArgs,
            decoding.cmd_demo, skip=GREEDY),
)
DATA_COMMANDS = (
    Command("generate", "answer prompts with the base model itself (resumable JSONL)", DataGenConfig,
            training.cmd_data_generate),
    Command("vocab", "rank the tokens of self-distillation data: a draft vocabulary (draft_vocab.json)",
            training.VocabArgs, training.cmd_data_vocab),
    Command("prompts", "varied user prompts sampled from the base model itself (Magpie; resumable)",
            training.PromptsArgs, training.cmd_data_prompts),
)


def _add(sub: argparse._SubParsersAction, cmd: Command) -> None:
    doc = " ".join((cmd.config.__doc__ or cmd.summary).split())
    p = sub.add_parser(cmd.name, help=cmd.summary, description=doc)
    add_flags(p, cmd.config, cmd.defaults, cmd.skip, cmd.only)
    p.set_defaults(_command=cmd)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models: decode several "
                                 "tokens per forward with Introspective Strided Decoding (ISD).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        _add(sub, cmd)
    data = sub.add_parser("data", help="self-distillation data: answers, prompts, a draft vocabulary",
                          description="Make the data a drafter trains on, with the base model itself.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for cmd in DATA_COMMANDS:
        _add(dsub, cmd)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from ..model import USER_ERRORS

    cmd: Command = ns._command
    try:
        return cmd.run(from_args(cmd.config, ns))
    except KeyboardInterrupt:
        print("idlm: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print("idlm: error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return EXIT_USAGE
