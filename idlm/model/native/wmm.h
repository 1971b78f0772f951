// idlm weight-only matmul (wmm.cpp): see there for the layouts and the arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace idlm {

// which instruction sets this build's kernels use, e.g. "bf16 activations: avx2, int8 activations: avx2"
std::string wmm_isa();
// a8: the layout of the int8-activation kernels (kind 14 / 18)
std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
                                             bool a8);
std::tuple<at::Tensor, at::Tensor> int8_pack(const at::Tensor& codes, const at::Tensor& scale, bool a8);
// kind 4: int4 groups of 32, kind 8: int8 per row (bf16 activations); 14 / 18: the same weights with int8
// activations per row and group of 32; returns (M, n) bf16
at::Tensor wmm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
               const c10::optional<at::Tensor>& bias);

}  // namespace idlm
