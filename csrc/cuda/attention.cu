// Attention over the paged KV cache for chunked prefill (packed causal chunks); decode goes
// to the split-context kernel of decode_attention.cu.
//
// A block owns kBlockM query rows of one sequence and one KV head. The rows of a sequence are
// its (query token, head of the GQA group) pairs, token-major, so every K/V tile the block
// loads serves all heads of the group. The block walks the keys in tiles of kBlockN held in
// shared memory as float32, computes the score tile and the P.V update from per-thread
// register micro-tiles, and keeps an online softmax (running max and sum per row, in the
// log2 domain: the queries are pre-scaled by scale * log2(e)). Query row r at position p sees
// keys 0..p; the chunk of sequence b ends at seq_lens[b], so its first query sits at
// seq_len - chunk_len.
#include <cmath>

#include "cuda/decode_attention.h"
#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

struct AttentionArgs {
  void* out;
  const void* query;
  int64_t query_row_stride;
  int num_tokens;
  int num_heads;
  int group;  // query heads per KV head
  int batch;
  PagedKVCache cache;
  const int32_t* cu_query_lens;
  const int32_t* seq_lens;
  int64_t seq_lens_stride;
  float scale_log2;  // scale * log2(e)
  bool cache_vectorised;  // caches 16-byte aligned: K/V rows are read in 16-byte vectors
};

// Tile shape. Threads form kRowGroups x kColGroups; thread (ty, tx) owns score rows
// ty + i * kRowGroups, keys tx + j * kColGroups and output dims tx + k * kColGroups, so a warp
// reads consecutive keys / dims (distinct banks) and at most two query rows (broadcast).
template <int HeadDimMax, int BlockM, int BlockN, int Threads>
struct TileConfig {
  static constexpr int kHeadDim = HeadDimMax;
  static constexpr int kBlockM = BlockM;
  static constexpr int kBlockN = BlockN;
  static constexpr int kThreads = Threads;
  static constexpr int kColGroups = 16;
  static constexpr int kRowGroups = Threads / kColGroups;
  static constexpr int kRowsPerThread = BlockM / kRowGroups;
  static constexpr int kKeysPerThread = BlockN / kColGroups;
  static constexpr int kDimsPerThread = HeadDimMax / kColGroups;
  // The softmax step gives each row kThreadsPerRow adjacent lanes.
  static constexpr int kThreadsPerRow = Threads / BlockM;
  static constexpr int kKeysPerSoftmaxThread = BlockN / kThreadsPerRow;
  // Odd strides: threads reading one column of different Q/K/P rows hit distinct banks.
  static constexpr int kQkStride = HeadDimMax + 1;
  static constexpr int kPStride = BlockN + 1;
  static constexpr int kSharedFloats =
      BlockM * kQkStride + BlockN * kQkStride + BlockN * HeadDimMax + BlockM * kPStride + 2 * BlockM;

  static_assert(Threads % 32 == 0 && BlockM % kRowGroups == 0 && BlockN % kColGroups == 0 &&
                HeadDimMax % kColGroups == 0, "tile does not divide among the threads");
  static_assert(Threads % BlockM == 0 && kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0 &&
                BlockN % kThreadsPerRow == 0, "softmax rows must map onto lanes of one warp");
};

// 64 rows (32 for head_dim 256, to bound registers and shared memory), 8 warps.
template <int HeadDimMax>
using PrefillTile = TileConfig<HeadDimMax, HeadDimMax <= 128 ? 64 : 32, 32, 256>;

// Eight consecutive elements (a multiple-of-8 offset into a K/V row) as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* src, bool vectorised, float (&dst)[8]) {
  if (vectorised) {
    constexpr int N = kVec16<T>;
#pragma unroll
    for (int part = 0; part < 8 / N; ++part) {
      const Vec<T, N> v = reinterpret_cast<const Vec<T, N>*>(src)[part];
#pragma unroll
      for (int k = 0; k < N; ++k) dst[part * N + k] = to_float(v.data[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) dst[k] = to_float(src[k]);
  }
}

template <int Width>
__device__ __forceinline__ float lanes_max(float v) {
#pragma unroll
  for (int offset = Width / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <int Width>
__device__ __forceinline__ float lanes_sum(float v) {
#pragma unroll
  for (int offset = Width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Prefill: which sequence, and which of its row tiles, the block `tile_index` covers. Warp 0
// scans the per-sequence tile counts 32 sequences at a time; *seq = -1 past the last tile.
__device__ void locate_tile(const int32_t* cu_query_lens, int batch, int group, int block_m,
                            int tile_index, int* seq, int* tile) {
  __shared__ int found_seq, found_tile;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int tiles_before = 0, result_seq = -1, result_tile = 0;
    for (int base = 0; base < batch; base += 32) {
      const int b = base + lane;
      int tiles = 0;
      if (b < batch) {
        const int rows = (cu_query_lens[b + 1] - cu_query_lens[b]) * group;
        tiles = rows > 0 ? (rows + block_m - 1) / block_m : 0;
      }
      int inclusive = tiles;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int below = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += below;
      }
      const int exclusive = inclusive - tiles;
      const int wanted = tile_index - tiles_before;
      const unsigned owner = __ballot_sync(kFullMask, wanted >= exclusive && wanted < inclusive);
      if (owner != 0) {
        const int src = __ffs(owner) - 1;
        result_seq = base + src;
        result_tile = wanted - __shfl_sync(kFullMask, exclusive, src);
        break;
      }
      tiles_before += __shfl_sync(kFullMask, inclusive, 31);
    }
    if (lane == 0) {
      found_seq = result_seq;
      found_tile = result_tile;
    }
  }
  __syncthreads();
  *seq = found_seq;
  *tile = found_tile;
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) paged_attention_kernel(const AttentionArgs args) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHeadDim = Cfg::kHeadDim;
  constexpr int kRowGroups = Cfg::kRowGroups, kColGroups = Cfg::kColGroups;
  constexpr int kRowsPerThread = Cfg::kRowsPerThread, kKeysPerThread = Cfg::kKeysPerThread;
  constexpr int kDimsPerThread = Cfg::kDimsPerThread, kThreadsPerRow = Cfg::kThreadsPerRow;
  constexpr int kQkStride = Cfg::kQkStride, kPStride = Cfg::kPStride;

  extern __shared__ float shared[];
  float* q_tile = shared;                          // [kBlockM][kQkStride], pre-scaled queries
  float* k_tile = q_tile + kBlockM * kQkStride;    // [kBlockN][kQkStride]
  float* v_tile = k_tile + kBlockN * kQkStride;    // [kBlockN][kHeadDim]
  float* p_tile = v_tile + kBlockN * kHeadDim;     // [kBlockM][kPStride], scores then weights
  float* row_rescale = p_tile + kBlockM * kPStride;  // [kBlockM], this tile's exp2(old - new max)
  float* row_total = row_rescale + kBlockM;           // [kBlockM], running softmax denominator
  __shared__ int row_key_limit[kBlockM];              // keys [0, limit) visible to each row

  const int group = args.group;
  int seq, tile;
  locate_tile(args.cu_query_lens, args.batch, group, kBlockM, blockIdx.x, &seq, &tile);
  if (seq < 0) return;  // the grid is an upper bound on the tiles
  const PagedKVCache& cache = args.cache;
  const int kv_head = blockIdx.y, head_dim = static_cast<int>(cache.head_dim);
  const int chunk_start = args.cu_query_lens[seq];
  const int chunk_len = args.cu_query_lens[seq + 1] - chunk_start;
  // Keys past the block table do not exist; bad lengths cannot be reported from here.
  const int seq_len = min(args.seq_lens[seq * args.seq_lens_stride],
                          static_cast<int>(cache.max_blocks * cache.block_size));
  const int first_position = seq_len - chunk_len;
  const int row0 = tile * kBlockM;  // first row of this tile within the sequence's rows
  const int tokens_here = chunk_start < 0 ? 0 : min(chunk_len, args.num_tokens - chunk_start);
  const int rows = max(0, min(kBlockM, tokens_here * group - row0));
  // Rows grow with the token, so the last row sees the most keys.
  const int key_end = rows > 0 ? max(0, first_position + (row0 + rows - 1) / group + 1) : 0;

  const int tid = threadIdx.x;
  for (int r = tid; r < kBlockM; r += Cfg::kThreads) {
    row_key_limit[r] = r < rows ? max(0, first_position + (row0 + r) / group + 1) : 0;
    row_total[r] = 0.0f;
  }
  for (int i = tid; i < kBlockM * head_dim; i += Cfg::kThreads) {
    const int r = i / head_dim, d = i % head_dim;
    float x = 0.0f;
    if (r < rows) {
      const int64_t token = chunk_start + (row0 + r) / group;
      const int64_t head = static_cast<int64_t>(kv_head) * group + (row0 + r) % group;
      x = to_float(static_cast<const T*>(args.query)[token * args.query_row_stride + head * head_dim + d]) *
          args.scale_log2;
    }
    q_tile[r * kQkStride + d] = x;
  }
  __syncthreads();

  const int ty = tid / kColGroups, tx = tid % kColGroups;
  const int softmax_row = tid / kThreadsPerRow, softmax_lane = tid % kThreadsPerRow;
  const int32_t* block_table = cache.block_tables + seq * cache.max_blocks;
  const T* keys = static_cast<const T*>(cache.keys);
  const T* values = static_cast<const T*>(cache.values);
  const int chunks_per_row = head_dim / 8;
  float acc[kRowsPerThread][kDimsPerThread] = {};
  float running_max = -INFINITY;  // of softmax_row, kept identical by its lanes

  for (int key0 = 0; key0 < key_end; key0 += kBlockN) {
    // K/V tile; keys past key_end or in an invalid block read as zeros, so that masked
    // weights (0) never meet stale or uninitialised values (0 * NaN).
    for (int i = tid; i < kBlockN * chunks_per_row; i += Cfg::kThreads) {
      const int c = i / chunks_per_row, d = (i % chunks_per_row) * 8;
      const int key = key0 + c;
      float k8[8] = {}, v8[8] = {};
      if (key < key_end) {
        const int64_t block = block_table[key / cache.block_size];
        if (block >= 0 && block < cache.num_blocks) {
          const int64_t slot = block * cache.block_size + key % cache.block_size;
          const int64_t offset = (slot * cache.kv_heads + kv_head) * head_dim + d;
          load8(keys + offset, args.cache_vectorised, k8);
          load8(values + offset, args.cache_vectorised, v8);
        }
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        k_tile[c * kQkStride + d + k] = k8[k];
        v_tile[c * kHeadDim + d + k] = v8[k];
      }
    }
    __syncthreads();

    // Scores (log2 domain), masked to each row's visible keys.
    {
      float s[kRowsPerThread][kKeysPerThread] = {};
#pragma unroll 4
      for (int d = 0; d < head_dim; ++d) {
        float q[kRowsPerThread], k[kKeysPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) q[i] = q_tile[(ty + i * kRowGroups) * kQkStride + d];
#pragma unroll
        for (int j = 0; j < kKeysPerThread; ++j) k[j] = k_tile[(tx + j * kColGroups) * kQkStride + d];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kKeysPerThread; ++j) s[i][j] += q[i] * k[j];
        }
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = ty + i * kRowGroups;
#pragma unroll
        for (int j = 0; j < kKeysPerThread; ++j) {
          const int c = tx + j * kColGroups;
          p_tile[r * kPStride + c] = key0 + c < row_key_limit[r] ? s[i][j] : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax, one row per kThreadsPerRow lanes: new running max, weights, and the
    // factor that rescales what the row accumulated so far.
    {
      float* p_row = p_tile + softmax_row * kPStride;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < Cfg::kKeysPerSoftmaxThread; ++j) {
        tile_max = fmaxf(tile_max, p_row[softmax_lane + j * kThreadsPerRow]);
      }
      const float new_max = fmaxf(running_max, lanes_max<kThreadsPerRow>(tile_max));
      // A row that has seen no visible key yet keeps max -inf: weights 0, nothing to rescale.
      const bool empty = new_max == -INFINITY;
      float weight_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < Cfg::kKeysPerSoftmaxThread; ++j) {
        float* p = p_row + softmax_lane + j * kThreadsPerRow;
        *p = empty ? 0.0f : exp2f(*p - new_max);
        weight_sum += *p;
      }
      weight_sum = lanes_sum<kThreadsPerRow>(weight_sum);
      const float rescale = empty ? 1.0f : exp2f(running_max - new_max);
      running_max = new_max;
      if (softmax_lane == 0) {
        row_rescale[softmax_row] = rescale;
        row_total[softmax_row] = row_total[softmax_row] * rescale + weight_sum;
      }
    }
    __syncthreads();

    // acc = acc * rescale + P V.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float rescale = row_rescale[ty + i * kRowGroups];
#pragma unroll
      for (int k = 0; k < kDimsPerThread; ++k) acc[i][k] *= rescale;
    }
#pragma unroll 4
    for (int c = 0; c < kBlockN; ++c) {
      float p[kRowsPerThread], v[kDimsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) p[i] = p_tile[(ty + i * kRowGroups) * kPStride + c];
#pragma unroll
      for (int k = 0; k < kDimsPerThread; ++k) v[k] = v_tile[c * kHeadDim + tx + k * kColGroups];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int k = 0; k < kDimsPerThread; ++k) acc[i][k] += p[i] * v[k];
      }
    }
    __syncthreads();  // the next tile overwrites k_tile, v_tile and p_tile
  }

  // A row with no visible key (empty context) outputs zeros, as the CPU kernel does.
  T* out = static_cast<T*>(args.out);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = ty + i * kRowGroups;
    if (r >= rows) continue;
    const int64_t token = chunk_start + (row0 + r) / group;
    const int64_t head = static_cast<int64_t>(kv_head) * group + (row0 + r) % group;
    const float total = row_total[r];
    const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
    T* out_row = out + (token * args.num_heads + head) * head_dim;
#pragma unroll
    for (int k = 0; k < kDimsPerThread; ++k) {
      const int d = tx + k * kColGroups;
      if (d < head_dim) out_row[d] = from_float<T>(acc[i][k] * inv_total);
    }
  }
}

template <typename T, typename Cfg>
cudaError_t launch_tiles(const AttentionArgs& args, unsigned row_tiles, cudaStream_t stream) {
  constexpr size_t shared_bytes = Cfg::kSharedFloats * sizeof(float);
  const auto kernel = paged_attention_kernel<T, Cfg>;
  if constexpr (shared_bytes > 48 * 1024) {
    // Beyond 48 KiB dynamic shared memory needs an opt-in (a host attribute, no stream work).
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(row_tiles, static_cast<unsigned>(args.cache.kv_heads));
  kernel<<<grid, Cfg::kThreads, shared_bytes, stream>>>(args);
  return cudaGetLastError();
}

// An upper bound: sum over b of ceil(chunk_b * group / block_m) <= tokens * group / block_m + batch.
unsigned prefill_row_tiles(const AttentionArgs& args, int block_m) {
  const int64_t rows = static_cast<int64_t>(args.num_tokens) * args.group;
  return static_cast<unsigned>((rows + block_m - 1) / block_m + args.batch);
}

// Instantiates the kernel for the smallest supported head-dim bucket that holds head_dim.
cudaError_t launch_prefill(const AttentionArgs& args, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t head_dim = args.cache.head_dim;
    if (head_dim <= 64) return launch_tiles<T, PrefillTile<64>>(args, prefill_row_tiles(args, PrefillTile<64>::kBlockM), stream);
    if (head_dim <= 128) return launch_tiles<T, PrefillTile<128>>(args, prefill_row_tiles(args, PrefillTile<128>::kBlockM), stream);
    return launch_tiles<T, PrefillTile<256>>(args, prefill_row_tiles(args, PrefillTile<256>::kBlockM), stream);
  });
}

AttentionArgs make_args(void* out, const void* query, int64_t query_row_stride, int64_t num_tokens,
                        int64_t num_heads, int64_t batch, const PagedKVCache& cache,
                        const int32_t* cu_query_lens, const int32_t* seq_lens, int64_t seq_lens_stride,
                        float scale) {
  constexpr float kLog2e = 1.4426950408889634f;
  const bool vectorised = is_aligned(cache.keys, 16) && is_aligned(cache.values, 16);
  return AttentionArgs{out, query, query_row_stride, static_cast<int>(num_tokens), static_cast<int>(num_heads),
                       static_cast<int>(num_heads / cache.kv_heads), static_cast<int>(batch), cache,
                       cu_query_lens, seq_lens, seq_lens_stride, scale * kLog2e, vectorised};
}

}  // namespace

int64_t paged_decode_attention_workspace(int64_t batch, int64_t num_heads, const PagedKVCache& cache) {
  const decode::Plan p = decode::plan(batch, num_heads, cache.kv_heads, cache.head_dim,
                                      cache.max_blocks * cache.block_size);
  return p.partial_floats * static_cast<int64_t>(sizeof(float));
}

cudaError_t paged_decode_attention(void* out, const void* query, int64_t query_row_stride,
                                   int64_t batch, int64_t num_heads, const PagedKVCache& cache,
                                   const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                   void* workspace, DType dtype, cudaStream_t stream) {
  const decode::TokenKeys keys{nullptr, seq_lens, seq_lens_stride, static_cast<int>(batch),
                               cache.max_blocks * cache.block_size};
  return decode::launch(decode::Launch(out, batch, num_heads, cache, keys, query, query_row_stride, scale, workspace),
                        dtype, stream);
}

cudaError_t paged_prefill_attention(void* out, const void* query, int64_t query_row_stride,
                                    int64_t num_tokens, int64_t num_heads, int64_t batch,
                                    const PagedKVCache& cache, const int32_t* cu_query_lens,
                                    const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                    DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || batch == 0 || num_heads == 0 || cache.kv_heads == 0) return cudaSuccess;
  const AttentionArgs args = make_args(out, query, query_row_stride, num_tokens, num_heads, batch, cache,
                                       cu_query_lens, seq_lens, seq_lens_stride, scale);
  return launch_prefill(args, dtype, stream);
}

}  // namespace lisa_rt::kernels
