// RMSNorm, alone and fused with the residual add that precedes it; one block per row,
// 16-byte vector accesses when the row and the pointers allow them.
#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

// `out` may alias `input` (each element is read and then written by the same thread).
template <typename T, int N>
__global__ void rms_norm_kernel(T* out, const T* input, const T* __restrict__ weight,
                                int64_t hidden, float eps) {
  using V = Vec<T, N>;
  const int64_t vectors = hidden / N;
  const V* in = reinterpret_cast<const V*>(input + blockIdx.x * hidden);
  V* o = reinterpret_cast<V*>(out + blockIdx.x * hidden);
  const V* w = reinterpret_cast<const V*>(weight);

  float squares = 0.0f;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V x = in[i];
#pragma unroll
    for (int k = 0; k < N; ++k) squares += to_float(x.data[k]) * to_float(x.data[k]);
  }
  const float inv_rms = rsqrtf(block_sum(squares) / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V x = in[i], g = w[i];
    V y;
#pragma unroll
    for (int k = 0; k < N; ++k) y.data[k] = from_float<T>(to_float(x.data[k]) * inv_rms * to_float(g.data[k]));
    o[i] = y;
  }
}

template <typename T, int N>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ input, T* __restrict__ residual,
                                          const T* __restrict__ weight, int64_t hidden, float eps) {
  using V = Vec<T, N>;
  const int64_t vectors = hidden / N;
  V* in = reinterpret_cast<V*>(input + blockIdx.x * hidden);
  V* res = reinterpret_cast<V*>(residual + blockIdx.x * hidden);
  const V* w = reinterpret_cast<const V*>(weight);

  float squares = 0.0f;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V x = in[i], r = res[i];
    V sum;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      sum.data[k] = from_float<T>(to_float(x.data[k]) + to_float(r.data[k]));
      const float rounded = to_float(sum.data[k]);  // normalise what is stored, as the reference does
      squares += rounded * rounded;
    }
    res[i] = sum;
  }
  const float inv_rms = rsqrtf(block_sum(squares) / static_cast<float>(hidden) + eps);
  // Each thread rereads only the residual elements it wrote itself: no barrier needed.
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V h = res[i], g = w[i];
    V y;
#pragma unroll
    for (int k = 0; k < N; ++k) y.data[k] = from_float<T>(to_float(h.data[k]) * inv_rms * to_float(g.data[k]));
    in[i] = y;
  }
}

template <typename T>
bool can_vectorise(int64_t hidden, const void* a, const void* b, const void* c) {
  return hidden % kVec16<T> == 0 && is_aligned(a, 16) && is_aligned(b, 16) && is_aligned(c, 16);
}

}  // namespace

cudaError_t rms_norm(void* out, const void* input, const void* weight, int64_t rows, int64_t hidden,
                     float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec16<T>;
    auto* o = static_cast<T*>(out);
    const auto* in = static_cast<const T*>(input);
    const auto* w = static_cast<const T*>(weight);
    if (can_vectorise<T>(hidden, out, input, weight)) {
      rms_norm_kernel<T, N><<<static_cast<unsigned>(rows), threads_for(hidden / N), 0, stream>>>(o, in, w, hidden, eps);
    } else {
      rms_norm_kernel<T, 1><<<static_cast<unsigned>(rows), threads_for(hidden), 0, stream>>>(o, in, w, hidden, eps);
    }
    return cudaGetLastError();
  });
}

cudaError_t fused_add_rms_norm(void* input, void* residual, const void* weight, int64_t rows,
                               int64_t hidden, float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec16<T>;
    auto* in = static_cast<T*>(input);
    auto* res = static_cast<T*>(residual);
    const auto* w = static_cast<const T*>(weight);
    if (can_vectorise<T>(hidden, input, residual, weight)) {
      fused_add_rms_norm_kernel<T, N><<<static_cast<unsigned>(rows), threads_for(hidden / N), 0, stream>>>(in, res, w, hidden, eps);
    } else {
      fused_add_rms_norm_kernel<T, 1><<<static_cast<unsigned>(rows), threads_for(hidden), 0, stream>>>(in, res, w, hidden, eps);
    }
    return cudaGetLastError();
  });
}

}  // namespace lisa_rt::kernels
