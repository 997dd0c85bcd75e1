// Shared checks and helpers of the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Asks for the cache line at p to be brought into L2 (locality 2: prefetcht1), for a read.
inline void prefetch_line_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

}  // namespace lisa_rt
