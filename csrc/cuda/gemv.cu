// out [rows, N] = input [rows, K] @ weight [N, K]^T for a decode step's few rows and a small
// weight, where cuBLAS is bound by latency rather than bytes: on an H200 its kernels took
// 3.7-3.9 us for each of SmolLM2's projections (0.7-3.5 MB), a few of its blocks streaming
// many weight rows each (BENCHMARKS.md, "Where the time goes").
//
// Here a warp owns one weight row and issues all of its 16-byte loads at once (a row of at
// most 32 x kMaxChunks vectors), so a launch waits on about one memory round trip; the input
// rows sit in shared memory, loaded by every block while its weight loads are in flight. Each
// output is one warp's float32 sum in a fixed order, whatever the number of rows: a row's
// result does not depend on the batch it is in.
#include <type_traits>

#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

constexpr int kWarps = 8;  // weight rows per block: every block reads all the input rows
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxRows = 8;    // input rows (a decode batch) this path takes
constexpr int kMaxChunks = 8;  // 16-byte vectors per lane along K

template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads) gemv_kernel(T* __restrict__ out, const T* __restrict__ input,
                                                         const T* __restrict__ weight, int rows, int n, int k) {
  constexpr int kVec = kVec16<T>;
  using V = Vec<T, kVec>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* x = reinterpret_cast<T*>(smem);  // [rows, k]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w_row = blockIdx.x * kWarps + warp;
  const int vectors = k / kVec;

  // The weight row's loads first: nothing they need comes from the input.
  V w[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int v = c * 32 + lane;
    if (w_row < n && v < vectors) w[c] = reinterpret_cast<const V*>(weight + static_cast<int64_t>(w_row) * k)[v];
  }
  // The input rows into shared memory, every load issued before the first store.
  constexpr int kStaged = kMaxRows * 32 * kMaxChunks / kThreads;  // vectors per thread, at most
  const V* in = reinterpret_cast<const V*>(input);
  V* xs = reinterpret_cast<V*>(x);
  V staged[kStaged];
#pragma unroll
  for (int j = 0; j < kStaged; ++j) {
    const int i = j * kThreads + threadIdx.x;
    if (i < rows * vectors) staged[j] = in[i];
  }
#pragma unroll
  for (int j = 0; j < kStaged; ++j) {
    const int i = j * kThreads + threadIdx.x;
    if (i < rows * vectors) xs[i] = staged[j];
  }
  __syncthreads();
  if (w_row >= n) return;

  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int v = c * 32 + lane;
    if (v >= vectors) break;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const V xv = xs[r * vectors + v];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[r] += to_float(w[c].data[e]) * to_float(xv.data[e]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == 0 && r < rows) out[static_cast<int64_t>(r) * n + w_row] = from_float<T>(total);
  }
}

}  // namespace

bool gemv_fits(int64_t rows, int64_t n, int64_t k, const void* input, const void* weight, DType dtype) {
  const int64_t vec = dtype == DType::kFloat32 ? 4 : 8;
  const int64_t element_bytes = dtype == DType::kFloat32 ? 4 : 2;
  return rows >= 1 && rows <= kMaxRows && n >= 1 && k >= vec && k % vec == 0 && k <= 32 * kMaxChunks * vec &&
         n * k * element_bytes <= kGemvMaxWeightBytes && n < (int64_t{1} << 31) / kWarps &&
         is_aligned(input, 16) && is_aligned(weight, 16);
}

cudaError_t gemv(void* out, const void* input, const void* weight, int64_t rows, int64_t n, int64_t k, DType dtype,
                 cudaStream_t stream) {
  if (!gemv_fits(rows, n, k, input, weight, dtype)) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  const size_t smem = static_cast<size_t>(rows * k) * (dtype == DType::kFloat32 ? 4 : 2);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto rows_tag) {
      constexpr int kRows = decltype(rows_tag)::value;
      gemv_kernel<T, kRows><<<blocks, kThreads, smem, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(input), static_cast<const T*>(weight), static_cast<int>(rows),
          static_cast<int>(n), static_cast<int>(k));
      return cudaGetLastError();
    };
    if (rows == 1) return go(std::integral_constant<int, 1>{});
    if (rows == 2) return go(std::integral_constant<int, 2>{});
    if (rows <= 4) return go(std::integral_constant<int, 4>{});
    return go(std::integral_constant<int, kMaxRows>{});
  });
}

}  // namespace lisa_rt::kernels
