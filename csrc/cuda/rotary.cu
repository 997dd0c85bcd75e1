// Rotary position embedding (HF half-rotation layout) in place on queries and keys; one
// thread per (token, head, rotated pair), the heads of query and key numbered together.
#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

struct RotaryArgs {
  const int64_t* positions;
  int64_t positions_stride;
  void* query;
  int64_t query_row_stride;
  int64_t query_heads;
  void* key;
  int64_t key_row_stride;
  int64_t key_heads;
  int64_t tokens;
  int64_t half_dim;
  const float* cos_sin_cache;
  int64_t max_positions;
};

template <typename T>
__global__ void rotary_embedding_kernel(RotaryArgs args) {
  const int64_t heads = args.query_heads + args.key_heads;
  const int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pair >= args.tokens * heads * args.half_dim) return;
  const int64_t i = pair % args.half_dim;
  const int64_t head = (pair / args.half_dim) % heads;
  const int64_t token = pair / (args.half_dim * heads);
  const int64_t position = args.positions[token * args.positions_stride];
  if (position < 0 || position >= args.max_positions) return;

  T* x = head < args.query_heads
             ? static_cast<T*>(args.query) + token * args.query_row_stride + head * 2 * args.half_dim
             : static_cast<T*>(args.key) + token * args.key_row_stride +
                   (head - args.query_heads) * 2 * args.half_dim;
  const float* cos = args.cos_sin_cache + position * 2 * args.half_dim;
  const float c = cos[i], s = cos[args.half_dim + i];
  const float x1 = to_float(x[i]), x2 = to_float(x[i + args.half_dim]);
  x[i] = from_float<T>(x1 * c - x2 * s);
  x[i + args.half_dim] = from_float<T>(x2 * c + x1 * s);
}

}  // namespace

cudaError_t rotary_embedding(const int64_t* positions, int64_t positions_stride, void* query,
                             int64_t query_row_stride, int64_t query_heads, void* key,
                             int64_t key_row_stride, int64_t key_heads, int64_t tokens,
                             int64_t head_dim, const float* cos_sin_cache, int64_t max_positions,
                             DType dtype, cudaStream_t stream) {
  const int64_t pairs = tokens * (query_heads + key_heads) * (head_dim / 2);
  if (pairs == 0) return cudaSuccess;
  const RotaryArgs args{positions, positions_stride, query,  query_row_stride, query_heads,
                        key,       key_row_stride,   key_heads, tokens,       head_dim / 2,
                        cos_sin_cache, max_positions};
  constexpr unsigned kThreads = 256;
  const auto blocks = static_cast<unsigned>((pairs + kThreads - 1) / kThreads);
  return dispatch_dtype(dtype, [&](auto tag) {
    rotary_embedding_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace lisa_rt::kernels
