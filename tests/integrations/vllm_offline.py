"""Runs under the vLLM virtual environment (not idlm's): greedy generation from token ids with vLLM's
offline ``LLM``, with or without a speculative config. Argument: one JSON object
{target, prompts: [[ids]], max_tokens, spec (optional)}; prints ``RESULT <json list of token-id lists>``."""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    args = json.loads(sys.argv[1])
    kw = {"model": args["target"], "dtype": "float32", "enforce_eager": True, "max_model_len": 512, "seed": 0,
          "gpu_memory_utilization": args.get("memory_fraction", 0.08)}  # on the CPU backend: of host RAM
    if args.get("spec"):
        kw["speculative_config"] = args["spec"]
    llm = LLM(**kw)
    params = SamplingParams(temperature=0, max_tokens=args["max_tokens"], ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
