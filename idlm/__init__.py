"""idlm: Introspective Diffusion Language Models."""

import os as _os

# oneDNN compiles a kernel per matmul shape and keeps 1,024 of them by default; a serving engine sees
# more shapes than that (batch sizes x layers' weights x attention lengths), and a recompile costs
# ~1 ms. Read when oneDNN creates its first kernel, so this must run before any torch matmul.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

__version__ = "0.1.0"
