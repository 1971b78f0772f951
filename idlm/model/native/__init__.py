"""idlm's native CPU code: the kernels every inference matmul and attention runs through, and the
native forward (``forward.cpp``), a decoder's whole layer stack in one C++ call.

* ``dense.cpp``: ``linear`` (fp32 / bf16 weights) and ``attend`` (one query row over its visible keys),
  used by the Python forward and the native one; ``wmm.cpp``: the quantized kernels (int4 / int8
  weights, bf16 or int8 activations). Every output's reduction order is fixed by the source, so a row's
  result never depends on how many rows share the call (what lossless ISD needs), on any CPU. The
  16-lane arithmetic (``simd.h``) is the same on AVX-512, AVX2 and the portable build.
* ``forward.cpp``: the Python forward costs ~8,000 ATen calls per step, and on a small CPU model their
  overhead is most of the step. The native forward runs the kernels above and does everything between
  them in plain per-row loops whose floating-point order is fixed. Used for bf16 inference on the CPU.

It is compiled on first use with the machine's C++ compiler (``torch.utils.cpp_extension``, ~20 s,
cached under ``$IDLM_CACHE/native`` per source, compiler flags and CPU) for the machine's own instruction
set (``-march=native``; ``IDLM_NATIVE_MARCH`` picks another). ``IDLM_NATIVE=0`` turns it off; without a
compiler the Python forward runs on PyTorch's kernels, which ``idlm.model.rowcheck`` checks at load.
The native and the Python forward are each exact and batch-invariant, but they round differently from
each other (like two thread counts): one process uses one of them for a model, never a mix.
"""

from .build import (  # noqa: F401 (the package's face; _state and _build_lock for the build tests)
    SOURCES,
    _build_lock,
    _state,
    build_tag,
    cpu_description,
    enabled_by_env,
    isa,
    load,
    ops,
    why,
)
from .plan import NativeRows, Plan, describe, unsupported  # noqa: F401
