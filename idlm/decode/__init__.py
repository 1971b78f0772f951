"""Pure decoding algorithms: sampling, verification, ISD and AR reference decoders."""

from .isd import DecodeResult, ISDState, StepResult, ar_generate, generate, isd_generate, isd_step
from .sampling import next_token, target_probs
from .verify import Verdict, verify_greedy, verify_sampled

__all__ = ["DecodeResult", "ISDState", "StepResult", "Verdict", "ar_generate", "generate", "isd_generate",
           "isd_step", "next_token", "target_probs", "verify_greedy", "verify_sampled"]
