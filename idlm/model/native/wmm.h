// idlm weight-only matmul (wmm.cpp): see there for the layouts and the arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace idlm {

bool wmm_available();
bool vnni_available();
// a8: the layout of the int8-activation kernels (kind 14 / 18)
std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
                                             bool a8);
std::tuple<at::Tensor, at::Tensor> int8_pack(const at::Tensor& codes, const at::Tensor& scale, bool a8);
// kind 4: int4 groups of 32, kind 8: int8 per row (bf16 activations); 14 / 18: the same weights with int8
// activations per row and group of 32; returns (M, n) bf16
at::Tensor wmm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& params, int64_t kind, int64_t n,
               const c10::optional<at::Tensor>& bias);

}  // namespace idlm
