// SwiGLU's gate: silu(gate) * up over the fused gate|up projection; one block per row.
#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

template <typename T, int N>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ input, int64_t width) {
  using V = Vec<T, N>;
  const int64_t vectors = width / N;
  const V* gate = reinterpret_cast<const V*>(input + blockIdx.x * 2 * width);
  const V* up = gate + vectors;
  V* o = reinterpret_cast<V*>(out + blockIdx.x * width);
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const V g = gate[i], u = up[i];
    V y;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float x = to_float(g.data[k]);
      y.data[k] = from_float<T>(x / (1.0f + __expf(-x)) * to_float(u.data[k]));
    }
    o[i] = y;
  }
}

}  // namespace

cudaError_t silu_and_mul(void* out, const void* input, int64_t rows, int64_t width, DType dtype,
                         cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec16<T>;
    auto* o = static_cast<T*>(out);
    const auto* in = static_cast<const T*>(input);
    const auto blocks = static_cast<unsigned>(rows);
    if (width % N == 0 && is_aligned(out, 16) && is_aligned(input, 16)) {
      silu_and_mul_kernel<T, N><<<blocks, threads_for(width / N), 0, stream>>>(o, in, width);
    } else {
      silu_and_mul_kernel<T, 1><<<blocks, threads_for(width), 0, stream>>>(o, in, width);
    }
    return cudaGetLastError();
  });
}

}  // namespace lisa_rt::kernels
