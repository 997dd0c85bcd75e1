// Shared checks and helpers of the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace lisa_rt {

// Activations and caches may be float32, bfloat16 or float16; arithmetic is float32.
#define LISA_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

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

// out [m, n] = x [m, k] float32 @ W^T for weights W [n, k] that weight_rows(r, rows) gives as
// float32 [rows, k], about 8 MB of them at a time: neither W nor the product is ever whole in
// float32 (for weights stored narrower: 16-bit, quantized).
template <typename WeightRows>
void mm_by_weight_blocks(at::Tensor& out, const at::Tensor& x, int64_t n, int64_t k, WeightRows weight_rows) {
  constexpr int64_t kBlockBytes = 8 << 20;
  const int64_t block = std::max<int64_t>(64, kBlockBytes / (4 * k));
  for (int64_t r = 0; r < n; r += block) {
    const int64_t rows = std::min(block, n - r);
    out.narrow(1, r, rows).copy_(at::mm(x, weight_rows(r, rows).t()));
  }
}

// Asks for the cache line at p to be brought into L2 (locality 2: prefetcht1), for a read.
inline void prefetch_line_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

}  // namespace lisa_rt
