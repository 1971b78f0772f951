// idlm dense matmul and attention for inference (dense.cpp): fixed reduction order by construction.
#pragma once

#include <ATen/ATen.h>

namespace idlm {

// The instruction set the 16-lane arithmetic (simd.h) was built for: "avx512", "avx2" or "portable".
const char* simd_isa();
// y (M, N) = x (M, K) w (N, K)^T + bias; x and w fp32 or bf16; y in x's dtype
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);
// q (B, G*T, D) with B = Hkv * R (row b belongs to sequence b % R), k and v (B, S, D), bias (R, T, S)
// fp32 (0: visible, -inf: not): softmax(q k^T / sqrt(D) + bias) v per row, (B, G*T, D) fp32
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, int64_t R,
                  int64_t G);

// RMSNorm over the last dim (fp32 or bf16, computed in fp32): x / sqrt(mean(x^2) + eps) * w
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
// silu(g) * u elementwise (fp32 or bf16, computed in fp32)
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u);

}  // namespace idlm
