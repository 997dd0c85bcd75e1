// Writes new keys and values into the paged KV cache; one block per token, copying raw bytes
// in the widest unit (16 bytes down to 2) that the row sizes, strides and pointers allow. Key and
// value rows may differ in size (a LiSA layer caches low-rank keys beside full values).
#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

struct CacheWriteArgs {
  const char* key;
  int64_t key_row_bytes_stride;
  const char* value;
  int64_t value_row_bytes_stride;
  char* key_cache;
  char* value_cache;
  const int64_t* slot_mapping;
  int64_t slot_mapping_stride;
  int64_t key_row_bytes;
  int64_t value_row_bytes;
  int64_t num_slots;
};

template <typename Unit>
__device__ void copy_row(const char* src, char* dst, int64_t bytes) {
  const auto* from = reinterpret_cast<const Unit*>(src);
  auto* to = reinterpret_cast<Unit*>(dst);
  for (int64_t i = threadIdx.x; i < bytes / static_cast<int64_t>(sizeof(Unit)); i += blockDim.x) to[i] = from[i];
}

template <typename Unit>
__global__ void cache_write_kernel(CacheWriteArgs args) {
  const int64_t token = blockIdx.x;
  const int64_t slot = args.slot_mapping[token * args.slot_mapping_stride];
  if (slot < 0 || slot >= args.num_slots) return;  // padding, or a slot the host cannot reject
  copy_row<Unit>(args.key + token * args.key_row_bytes_stride, args.key_cache + slot * args.key_row_bytes,
                 args.key_row_bytes);
  copy_row<Unit>(args.value + token * args.value_row_bytes_stride, args.value_cache + slot * args.value_row_bytes,
                 args.value_row_bytes);
}

template <typename Unit>
cudaError_t launch(const CacheWriteArgs& args, int64_t tokens, cudaStream_t stream) {
  const int64_t widest = args.key_row_bytes > args.value_row_bytes ? args.key_row_bytes : args.value_row_bytes;
  const unsigned threads = threads_for(widest / static_cast<int64_t>(sizeof(Unit)));
  cache_write_kernel<Unit><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cache_write(const void* key, int64_t key_row_stride, const void* value,
                        int64_t value_row_stride, void* key_cache, void* value_cache,
                        const int64_t* slot_mapping, int64_t slot_mapping_stride, int64_t tokens,
                        int64_t key_row_elements, int64_t value_row_elements, int64_t num_slots, DType dtype,
                        cudaStream_t stream) {
  if (tokens == 0 || (key_row_elements == 0 && value_row_elements == 0)) return cudaSuccess;
  const int64_t element_bytes = dtype == DType::kFloat32 ? 4 : 2;
  const CacheWriteArgs args{static_cast<const char*>(key),   key_row_stride * element_bytes,
                            static_cast<const char*>(value), value_row_stride * element_bytes,
                            static_cast<char*>(key_cache),   static_cast<char*>(value_cache),
                            slot_mapping,                    slot_mapping_stride,
                            key_row_elements * element_bytes, value_row_elements * element_bytes,
                            num_slots};
  const auto fits = [&](int64_t unit) {
    return args.key_row_bytes % unit == 0 && args.value_row_bytes % unit == 0 &&
           args.key_row_bytes_stride % unit == 0 && args.value_row_bytes_stride % unit == 0 &&
           is_aligned(key, unit) && is_aligned(value, unit) && is_aligned(key_cache, unit) &&
           is_aligned(value_cache, unit);
  };
  if (fits(16)) return launch<uint4>(args, tokens, stream);
  if (fits(8)) return launch<uint2>(args, tokens, stream);
  if (fits(4)) return launch<uint32_t>(args, tokens, stream);
  return launch<uint16_t>(args, tokens, stream);
}

}  // namespace lisa_rt::kernels
