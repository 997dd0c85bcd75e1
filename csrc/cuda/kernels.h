// Host launchers of the CUDA kernels (cuda/*.cu). Plain CUDA: raw pointers, sizes and strides
// in elements, no torch types, so nvcc compiles the kernels without a CUDA build of torch.
// Every launcher enqueues on `stream`, allocates nothing, never synchronises, and returns
// cudaGetLastError() after its launch (cudaSuccess when there is nothing to do). The attention
// launchers that split a decode step over the context take a `workspace` of the size their
// *_workspace function returns for the same shapes (bytes; 0 means null is fine).
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

// out [rows, n] = input [rows, k] @ weight [n, k]^T, all contiguous, for a decode step's few
// rows and a small weight (gemv.cu): where gemv_fits is true (at most 8 rows, k a multiple of
// a 16-byte vector's elements and at most 256 of them, a weight of at most kGemvMaxWeightBytes,
// input and weight 16-byte aligned); larger products are cuBLAS's.
constexpr int64_t kGemvMaxWeightBytes = int64_t{16} << 20;
bool gemv_fits(int64_t rows, int64_t n, int64_t k, const void* input, const void* weight, DType dtype);
cudaError_t gemv(void* out, const void* input, const void* weight, int64_t rows, int64_t n, int64_t k, DType dtype,
                 cudaStream_t stream);

// out [rows, width] = silu(input[:, :width]) * input[:, width:], both contiguous.
cudaError_t silu_and_mul(void* out, const void* input, int64_t rows, int64_t width, DType dtype,
                         cudaStream_t stream);

// HF half-rotation RoPE in place on query [tokens, query_heads, dim] and key
// [tokens, kv_heads, dim] (heads packed, row strides free), then the rotated key and value
// [tokens, kv_heads, value_dim] into slot slot_mapping[t] of key_cache [.., kv_heads, dim] and
// value_cache [.., kv_heads, value_dim]. The device cannot raise: a token whose position lies
// outside [0, max_positions) is left unrotated, and one whose slot is negative (padding) or
// >= num_slots caches nothing.
cudaError_t rotary_cache_write(const int64_t* positions, int64_t positions_stride, void* query,
                               int64_t query_row_stride, int64_t query_heads, void* key, int64_t key_row_stride,
                               const void* value, int64_t value_row_stride, int64_t kv_heads, int64_t dim,
                               int64_t value_dim, void* key_cache, void* value_cache, const int64_t* slot_mapping,
                               int64_t slot_mapping_stride, int64_t num_slots, int64_t tokens,
                               const float* cos_sin_cache, int64_t max_positions, DType dtype, cudaStream_t stream);

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
int64_t paged_decode_attention_workspace(int64_t batch, int64_t num_heads, const PagedKVCache& cache);
cudaError_t paged_decode_attention(void* out, const void* query, int64_t query_row_stride,
                                   int64_t batch, int64_t num_heads, const PagedKVCache& cache,
                                   const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                   void* workspace, DType dtype, cudaStream_t stream);

// Causal attention of packed query chunks [num_tokens, num_heads, head_dim]: the queries
// cu_query_lens[b]..cu_query_lens[b+1] of sequence b sit at its last positions, ending at
// seq_lens[b]. out [num_tokens, num_heads, head_dim] contiguous.
cudaError_t paged_prefill_attention(void* out, const void* query, int64_t query_row_stride,
                                    int64_t num_tokens, int64_t num_heads, int64_t batch,
                                    const PagedKVCache& cache, const int32_t* cu_query_lens,
                                    const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                    DType dtype, cudaStream_t stream);

// Causal attention of packed query chunks exactly as paged_prefill_attention (query and cache
// head dims equal), which also writes the scaled, pre-mask logits scale * q . k of query row t,
// head hd and key j <= p into scores[(t * num_heads + hd) * max_keys + j] (float32); columns
// past p are left untouched.
int64_t paged_attention_scores_workspace(int64_t num_tokens, int64_t num_heads, int64_t batch,
                                         const PagedKVCache& cache, int64_t max_keys);
cudaError_t paged_attention_scores(void* out, float* scores, int64_t max_keys, const void* query,
                                   int64_t query_row_stride, int64_t num_tokens, int64_t num_heads,
                                   int64_t batch, const PagedKVCache& cache, const int32_t* cu_query_lens,
                                   const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                   void* workspace, DType dtype, cudaStream_t stream);

// LiSA attention (DESIGN section 3) over packed query chunks. `cache.keys` is the low-rank key
// cache [num_blocks, block_size, kv_heads, rank] and `cache.values` the value cache
// [.., kv_heads, head_dim]; query_lr [num_tokens, num_heads, rank] (row stride free). Logits
//   S[t, hd, j] = (A a + W2 silu(W1 a + b1) + b2)[hd] + delta_scale * q'[t, hd] . k'[j],
// a = scores_prev[t, :, j] (float32 [num_tokens, num_heads, prev_keys]); A [heads, heads],
// W1 [width, heads], b1 [width], W2 [heads, width], b2 [heads], all float32 contiguous.
// out [num_tokens, num_heads, head_dim] = softmax(S over j <= p) V. When scores_out is not null
// (float32 [num_tokens, num_heads, out_keys], not overlapping scores_prev) S is written there
// for j <= p. Returns cudaErrorInvalidConfiguration when the shapes need more shared memory
// than a block may have. out_keys is 0 when scores_out is null.
int64_t lisa_attention_workspace(int64_t num_tokens, int64_t num_heads, int64_t batch, const PagedKVCache& cache,
                                 int64_t width, int64_t prev_keys, bool has_scores_out, int64_t out_keys);
cudaError_t lisa_attention(void* out, float* scores_out, int64_t out_keys, const float* scores_prev,
                           int64_t prev_keys, const void* query_lr, int64_t query_row_stride, int64_t rank,
                           int64_t num_tokens, int64_t num_heads, int64_t batch, const PagedKVCache& cache,
                           const int32_t* cu_query_lens, const int32_t* seq_lens, int64_t seq_lens_stride,
                           const float* align_a, const float* align_w1, const float* align_b1,
                           const float* align_w2, const float* align_b2, int64_t width, float delta_scale,
                           void* workspace, DType dtype, cudaStream_t stream);

}  // namespace lisa_rt::kernels
