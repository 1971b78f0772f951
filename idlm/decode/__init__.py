"""Pure decoding algorithms: sampling, verification, ISD windows and steps, and the batch-1 ISD and AR
reference decoders (the engine's test oracle)."""

from .isd import (
                  DecodeResult,
                  ISDState,
                  StepResult,
                  StepSettings,
                  Window,
                  WindowLogits,
                  ar_generate,
                  build_window,
                  isd_generate,
                  isd_step,
                  randomness,
)
from .sampling import KeyedNoise, next_token, pick, target_probs
from .stop import StopRule
from .verify import Verdict, verify_greedy, verify_keyed, verify_sampled

__all__ = ["DecodeResult", "ISDState", "KeyedNoise", "StepResult", "StepSettings", "StopRule", "Verdict", "Window",
           "WindowLogits", "ar_generate", "build_window", "isd_generate", "isd_step", "next_token",
           "pick", "randomness", "target_probs", "verify_greedy", "verify_keyed", "verify_sampled"]
