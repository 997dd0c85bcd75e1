// RoPE (HF half-rotation layout) in place on a layer's new queries and keys, and the rotated
// keys and the values into the paged KV cache, in one launch (a decode step pays a few
// microseconds per launch, whatever it does). One block per token: a thread rotates one pair
// of dims of a query or key head, writing a key's pair to the cache too; then the block copies
// the value row, in 16-byte pieces when the sizes and pointers allow.
#include <algorithm>

#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

struct RotaryCacheArgs {
  const int64_t* positions;
  int64_t positions_stride;
  void* query;
  int64_t query_row_stride;
  int64_t query_heads;
  void* key;
  int64_t key_row_stride;
  const void* value;
  int64_t value_row_stride;
  int64_t kv_heads;
  int64_t dim;           // query and key head dim (rotated)
  int64_t value_dim;
  void* key_cache;       // [num_slots, kv_heads, dim]
  void* value_cache;     // [num_slots, kv_heads, value_dim]
  const int64_t* slot_mapping;
  int64_t slot_mapping_stride;
  int64_t num_slots;
  const float* cos_sin_cache;
  int64_t max_positions;
};

template <typename T, int kValueVec>
__global__ void __launch_bounds__(1024) rotary_cache_write_kernel(const RotaryCacheArgs a) {
  const int64_t t = blockIdx.x;
  const int64_t position = a.positions[t * a.positions_stride];
  const int64_t slot = a.slot_mapping[t * a.slot_mapping_stride];
  // A position the host cannot reject leaves its rows unrotated; a negative slot (padding) or
  // one past the cache caches nothing.
  const bool rotate = position >= 0 && position < a.max_positions;
  const bool store = slot >= 0 && slot < a.num_slots;
  const int64_t half = a.dim / 2;
  const float* cos = a.cos_sin_cache + (rotate ? position : 0) * a.dim;
  T* key_row_cache = static_cast<T*>(a.key_cache) + slot * a.kv_heads * a.dim;
  const int64_t pairs = (a.query_heads + a.kv_heads) * half;
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t head = i / half, j = i % half;
    const bool is_key = head >= a.query_heads;
    T* x = is_key ? static_cast<T*>(a.key) + t * a.key_row_stride + (head - a.query_heads) * a.dim
                  : static_cast<T*>(a.query) + t * a.query_row_stride + head * a.dim;
    T y1 = x[j], y2 = x[j + half];
    if (rotate) {
      const float c = cos[j], s = cos[half + j];
      const float x1 = to_float(y1), x2 = to_float(y2);
      y1 = from_float<T>(x1 * c - x2 * s);
      y2 = from_float<T>(x2 * c + x1 * s);
      x[j] = y1;
      x[j + half] = y2;
    }
    if (is_key && store) {
      T* cached = key_row_cache + (head - a.query_heads) * a.dim;
      cached[j] = y1;
      cached[j + half] = y2;
    }
  }
  if (!store) return;
  using V = Vec<T, kValueVec>;
  const int64_t vectors = a.kv_heads * a.value_dim / kValueVec;
  const V* src = reinterpret_cast<const V*>(static_cast<const T*>(a.value) + t * a.value_row_stride);
  V* dst = reinterpret_cast<V*>(static_cast<T*>(a.value_cache) + slot * a.kv_heads * a.value_dim);
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

cudaError_t rotary_cache_write(const int64_t* positions, int64_t positions_stride, void* query,
                               int64_t query_row_stride, int64_t query_heads, void* key, int64_t key_row_stride,
                               const void* value, int64_t value_row_stride, int64_t kv_heads, int64_t dim,
                               int64_t value_dim, void* key_cache, void* value_cache, const int64_t* slot_mapping,
                               int64_t slot_mapping_stride, int64_t num_slots, int64_t tokens,
                               const float* cos_sin_cache, int64_t max_positions, DType dtype, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const RotaryCacheArgs args{positions,    positions_stride, query,       query_row_stride, query_heads,
                             key,          key_row_stride,   value,       value_row_stride, kv_heads,
                             dim,          value_dim,        key_cache,   value_cache,      slot_mapping,
                             slot_mapping_stride, num_slots, cos_sin_cache, max_positions};
  const int64_t value_elements = kv_heads * value_dim;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kVec16<T>;
    const bool vectorised = value_elements % N == 0 && value_row_stride % N == 0 && is_aligned(value, 16) &&
                            is_aligned(value_cache, 16);
    const int64_t work = std::max<int64_t>((query_heads + kv_heads) * (dim / 2), value_elements / (vectorised ? N : 1));
    const unsigned threads = threads_for(work);
    if (vectorised) {
      rotary_cache_write_kernel<T, N><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(args);
    } else {
      rotary_cache_write_kernel<T, 1><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(args);
    }
    return cudaGetLastError();
  });
}

}  // namespace lisa_rt::kernels
