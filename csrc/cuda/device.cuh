// Helpers shared by the kernels of cuda/*.cu: element conversions, vector accesses,
// reductions, and the host-side dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels.h"

namespace lisa_rt::kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round-to-nearest-even, as torch's casts do.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// N consecutive elements read or written as one access (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T data[N];
};

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

// Eight consecutive elements (zeros where `ok` is false), in 16-byte loads when `vectorised`
// (src then 16-byte aligned).
template <typename T>
__device__ __forceinline__ Vec<T, 8> load_row8(const T* src, bool ok, bool vectorised) {
  Vec<T, 8> v;
  if (ok && vectorised) {
    constexpr int N = kVec16<T>;
#pragma unroll
    for (int part = 0; part < 8 / N; ++part) {
      const Vec<T, N> chunk = reinterpret_cast<const Vec<T, N>*>(src)[part];
#pragma unroll
      for (int k = 0; k < N; ++k) v.data[part * N + k] = chunk.data[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v.data[k] = ok ? src[k] : from_float<T>(0.0f);
  }
  return v;
}

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the whole block, returned to every thread. Call it from every thread, once per
// kernel (its shared scratch is not reset for a second use).
__device__ inline float block_sum(float v) {
  __shared__ float warp_partials[32];
  __shared__ float total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x + 31) / 32 ? warp_partials[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Threads for a block that walks `work` items: a multiple of the warp size, at most 1024.
inline unsigned threads_for(int64_t work) {
  const int64_t warps = (work + 31) / 32;
  return static_cast<unsigned>(32 * (warps < 1 ? 1 : warps > 32 ? 32 : warps));
}

// Calls launch(T{}) with T the element type of dtype.
template <typename Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(float{});
    case DType::kBFloat16:
      return launch(__nv_bfloat16{});
    case DType::kFloat16:
      return launch(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace lisa_rt::kernels
