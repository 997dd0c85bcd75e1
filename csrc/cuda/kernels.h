// Host launchers of the CUDA kernels (cuda/*.cu). Plain CUDA: raw pointers, sizes and strides
// in elements, no torch types, so nvcc compiles the kernels without a CUDA build of torch.
// Every launcher enqueues on `stream`, allocates nothing, never synchronises, and returns
// cudaGetLastError() after its launch (cudaSuccess when there is nothing to do).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lisa_rt::kernels {

// Element type of activations and KV caches; arithmetic is float32 whatever the storage.
enum class DType { kFloat32, kBFloat16, kFloat16 };

// out[r, :] = input[r, :] / rms(input[r, :]) * weight, rows of `hidden` contiguous elements.
cudaError_t rms_norm(void* out, const void* input, const void* weight, int64_t rows, int64_t hidden,
                     float eps, DType dtype, cudaStream_t stream);

// residual += input; input = rms_norm(residual) * weight (the sum is rounded to the storage
// type before it is normalised, as the reference does).
cudaError_t fused_add_rms_norm(void* input, void* residual, const void* weight, int64_t rows,
                               int64_t hidden, float eps, DType dtype, cudaStream_t stream);

// out [rows, width] = silu(input[:, :width]) * input[:, width:], both contiguous.
cudaError_t silu_and_mul(void* out, const void* input, int64_t rows, int64_t width, DType dtype,
                         cudaStream_t stream);

// HF half-rotation RoPE in place on query [tokens, query_heads, head_dim] and key
// [tokens, key_heads, head_dim] (heads packed, row strides free). Tokens whose position lies
// outside [0, max_positions) are left untouched: the device cannot raise.
cudaError_t rotary_embedding(const int64_t* positions, int64_t positions_stride, void* query,
                             int64_t query_row_stride, int64_t query_heads, void* key,
                             int64_t key_row_stride, int64_t key_heads, int64_t tokens,
                             int64_t head_dim, const float* cos_sin_cache, int64_t max_positions,
                             DType dtype, cudaStream_t stream);

// Copies row t of key/value (row_elements packed elements) to slot slot_mapping[t] of the
// caches; negative slots (padding) and slots >= num_slots are skipped.
cudaError_t cache_write(const void* key, int64_t key_row_stride, const void* value,
                        int64_t value_row_stride, void* key_cache, void* value_cache,
                        const int64_t* slot_mapping, int64_t slot_mapping_stride, int64_t tokens,
                        int64_t row_elements, int64_t num_slots, DType dtype, cudaStream_t stream);

// A paged KV cache: keys/values [num_blocks, block_size, kv_heads, head_dim] contiguous,
// block_tables int32 [batch, max_blocks] contiguous.
struct PagedKVCache {
  const void* keys;
  const void* values;
  const int32_t* block_tables;
  int64_t max_blocks;
  int64_t block_size;
  int64_t num_blocks;
  int64_t kv_heads;
  int64_t head_dim;  // a multiple of 8, at most kMaxHeadDim
};

constexpr int64_t kMaxHeadDim = 256;

// One query per sequence: query [batch, num_heads, head_dim] (row stride free), out the same
// shape, contiguous; sequence b attends to its first seq_lens[b] cached tokens.
cudaError_t paged_decode_attention(void* out, const void* query, int64_t query_row_stride,
                                   int64_t batch, int64_t num_heads, const PagedKVCache& cache,
                                   const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                   DType dtype, cudaStream_t stream);

// Causal attention of packed query chunks [num_tokens, num_heads, head_dim]: the queries
// cu_query_lens[b]..cu_query_lens[b+1] of sequence b sit at its last positions, ending at
// seq_lens[b]. out [num_tokens, num_heads, head_dim] contiguous.
cudaError_t paged_prefill_attention(void* out, const void* query, int64_t query_row_stride,
                                    int64_t num_tokens, int64_t num_heads, int64_t batch,
                                    const PagedKVCache& cache, const int32_t* cu_query_lens,
                                    const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                    DType dtype, cudaStream_t stream);

}  // namespace lisa_rt::kernels
