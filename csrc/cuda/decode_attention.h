// The split-context decode attention of decode_attention.cu, shared by the ops of
// attention.cu (full attention) and lisa_attention.cu (logits handed on, LiSA).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"

namespace lisa_rt::kernels::decode {

// Which keys each query token sees.
struct TokenKeys {
  const int32_t* cu_query_lens;  // null: token b is sequence b's only query
  const int32_t* seq_lens;
  int64_t seq_lens_stride;
  int batch;
  int64_t key_limit;  // keys at or past this do not exist (block table capacity, logits widths)
};

#ifdef __CUDACC__
// Number of keys visible to query token t (keys 0..position), and its sequence in *seq. The
// chunk of sequence b is tokens cu[b]..cu[b+1]-1, ending at position seq_lens[b]-1. A token
// outside its chunk sees none; lengths past key_limit are clamped (only a host check could
// reject them, and that would need a sync).
__device__ inline int visible_keys(const TokenKeys& k, int t, int* seq) {
  int b = t, chunk_start = t, chunk_len = 1;
  if (k.cu_query_lens != nullptr) {
    int lo = 0, hi = k.batch - 1;  // the last b with cu[b] <= t
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (k.cu_query_lens[mid] <= t) lo = mid; else hi = mid - 1;
    }
    b = lo;
    chunk_start = k.cu_query_lens[b];
    chunk_len = k.cu_query_lens[b + 1] - chunk_start;
  }
  *seq = b;
  if (t < chunk_start || t >= chunk_start + chunk_len) return 0;
  const int64_t seq_len = k.seq_lens[b * k.seq_lens_stride];
  const int64_t position = seq_len - (chunk_start + chunk_len - t);
  const int64_t n = min(position + 1, min(seq_len, k.key_limit));
  return n > 0 ? static_cast<int>(n) : 0;
}
#endif

// How a launch divides its work; the scratch it needs follows from it.
struct Plan {
  int splits = 1;           // key splits per (token, head), merged by a second kernel when > 1
  int head_chunks = 1;      // blocks per KV head (a block takes at most 8 heads of its group)
  int64_t partial_floats = 0;  // float32 scratch of the splits
};

// The device's SM count (132 when it cannot be read): work is divided to fill them.
int sm_count();

Plan plan(int64_t num_tokens, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t max_keys);

// logits[t, hd, j] = logits_in[t, hd, j] (when given) + scale * q[t, hd] . k[j]; out =
// softmax over the visible keys, times V.
struct Launch {
  Launch(void* out, int64_t num_tokens, int64_t num_heads, const PagedKVCache& cache, const TokenKeys& keys,
         const void* query, int64_t query_row_stride, float scale, void* workspace)
      : out(out), num_tokens(num_tokens), num_heads(num_heads), cache(cache), keys(keys), query(query),
        query_row_stride(query_row_stride), scale(scale), workspace(static_cast<float*>(workspace)) {}

  void* out;                    // [tokens, heads, head_dim] contiguous (head_dim: cache.head_dim)
  int64_t num_tokens;
  int64_t num_heads;
  PagedKVCache cache;           // values [.., kv_heads, head_dim]; keys [.., kv_heads, key_dim]
  TokenKeys keys;
  const void* query;            // [tokens, heads, key_dim], rows query_row_stride apart
  int64_t query_row_stride;
  float scale;
  float* workspace;             // plan(...).partial_floats floats
  int64_t key_dim = 0;          // 0: cache.head_dim
  const float* logits_in = nullptr;  // [tokens, heads, logits_in_keys]
  int64_t logits_in_keys = 0;
  float* logits_out = nullptr;  // the logits, [tokens, heads, logits_out_keys]; may be logits_in
  int64_t logits_out_keys = 0;
};

cudaError_t launch(const Launch& x, DType dtype, cudaStream_t stream);

}  // namespace lisa_rt::kernels::decode
