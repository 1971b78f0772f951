// idlm weight-only matmul (wmm.cpp): see there for the layouts and the arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace idlm {

bool wmm_available();
std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum);
std::tuple<at::Tensor, at::Tensor> int8_pack(const at::Tensor& codes, const at::Tensor& scale);
// kind 4: int4 groups of 32, kind 8: int8 per row; returns (M, n) bf16
at::Tensor wmm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
               const c10::optional<at::Tensor>& bias);

}  // namespace idlm
