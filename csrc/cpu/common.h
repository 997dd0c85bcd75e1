// Shared checks and helpers of the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace lisa_rt {

// Activations and caches may be float32, bfloat16 or float16; arithmetic is float32.
#define LISA_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// [rows, heads, dim] views whose last two dims are packed; the row stride is free, so
// the q/k/v slices of a fused projection can be passed without a copy.
inline void check_packed_heads(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [tokens, heads, head_dim]");
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              " must have packed heads (stride (*, head_dim, 1))");
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device() == b.device(), what, ": tensors on different devices");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtype mismatch (", a.scalar_type(),
              " vs ", b.scalar_type(), ")");
}

// Dot product with several independent accumulators so the compiler can vectorise it.
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<float>(a[i + j]) * static_cast<float>(b[i + j]);
  }
  float sum = 0;
  for (; i < n; ++i) sum += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  for (int j = 0; j < 8; ++j) sum += acc[j];
  return sum;
}

}  // namespace lisa_rt
