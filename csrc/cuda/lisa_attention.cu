// LiSA attention (DESIGN section 3) and the full attention that also emits its logits.
//
// Decode-shaped calls (one query token per sequence) go to the split-context kernel of
// decode_attention.cu: the full attention computes its q . k logits there and writes them out;
// LiSA first computes the aligned part of every head's logits (lisa_decode_logits_kernel,
// below: the aligner mixes all heads of a key), and that kernel adds the low-rank delta
// q' . k' (its q . k over rank dims), hands the sum on and runs softmax + P V. Prefill chunks
// use the tiled kernel here.
//
// One tiled kernel serves both ops. A block owns one query row t and one KV head: the `group`
// query heads hd = kv_head * group + i that share that KV head. It walks the row's visible keys
// j = 0..p in tiles of kTileKeys (one warp's width) and, per tile:
//   1. loads the key rows (full keys, or the low-rank keys k') and the value rows as float32;
//      in LiSA mode it also loads a[j] = scores_prev[t, :, j] (all h heads: the aligner mixes
//      heads) and computes hidden[j] = silu(W1 a[j] + b1);
//   2. computes the logits of its heads
//        S[hd, j] = (A a[j] + W2 hidden[j] + b2)[hd] + qk_scale * q[hd] . k[j]
//      (only the second term in full mode), writes them to scores_out when given, and masks
//      keys past p with -inf;
//   3. updates an online softmax per head (one warp per head row) and acc = acc * rescale + P V.
// The hidden layer is recomputed by each of the g blocks of a row; that keeps every block's
// work independent (no inter-block exchange) at the price of g * m * h multiply-adds per key.
//
// All arithmetic is float32. Keys past p, and keys whose block id is invalid, read as zeros so
// that masked weights (0) never meet NaN or stale data. No host sync, no allocation, current
// stream: the launch is graph-capturable. Inputs that only a host check could reject (lengths
// beyond the block table or the scores buffers, cu_query_lens that do not span the rows) are
// clamped here rather than read out of bounds.
#include <algorithm>
#include <cmath>

#include "cuda/decode_attention.h"
#include "device.cuh"

namespace lisa_rt::kernels {
namespace {

constexpr int kTileKeys = 32;  // keys per tile: one per lane in the softmax step
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The head aligner of a LiSA layer (DESIGN section 3), float32 contiguous.
struct Aligner {
  const float* a;   // A [heads, heads]
  const float* w1;  // W1 [width, heads]
  const float* b1;  // [width]
  const float* w2;  // W2 [heads, width]
  const float* b2;  // [heads]
  int width;
};

struct LisaArgs {
  void* out;              // [tokens, heads, head_dim] contiguous
  const void* query;      // [tokens, heads, qk_dim], row stride query_row_stride
  int64_t query_row_stride;
  const void* keys;       // [num_blocks, block_size, kv_heads, qk_dim] contiguous
  const void* values;     // [num_blocks, block_size, kv_heads, head_dim] contiguous
  const int32_t* block_tables;
  int64_t max_blocks;
  int64_t block_size;
  int64_t num_blocks;
  const int32_t* cu_query_lens;
  const int32_t* seq_lens;
  int64_t seq_lens_stride;
  int num_tokens;
  int batch;
  int heads;
  int kv_heads;
  int group;
  int qk_dim;
  int head_dim;
  float qk_scale;
  // LiSA mode (scores_prev != nullptr).
  const float* scores_prev;  // [tokens, heads, prev_keys]
  int64_t prev_keys;
  Aligner aligner;
  bool weights_in_shared;
  // Optional logits output [tokens, heads, out_keys].
  float* scores_out;
  int64_t out_keys;
};

// Odd row strides, so that threads reading one column of different rows hit distinct banks.
__host__ __device__ inline int odd_stride(int n) { return n % 2 == 0 ? n + 1 : n; }

// Float offsets of the shared-memory arrays; the host sizes the launch with the same code.
struct SharedLayout {
  int q, k, v, a, hidden, p, acc, row_max, row_total, row_rescale, w1, w2, align_a, end_base, end;
  __host__ __device__ SharedLayout(const LisaArgs& x, bool lisa) {
    int at = 0;
    auto take = [&at](int floats) { const int offset = at; at += floats; return offset; };
    q = take(x.group * x.qk_dim);                            // [group][qk_dim]
    k = take(kTileKeys * odd_stride(x.qk_dim));              // [keys][qk stride]
    v = take(kTileKeys * x.head_dim);                        // [keys][head_dim]
    a = take(lisa ? kTileKeys * odd_stride(x.heads) : 0);    // [keys][heads stride]
    hidden = take(lisa ? kTileKeys * odd_stride(x.aligner.width) : 0);  // [keys][width stride]
    p = take(x.group * (kTileKeys + 1));                     // [group][keys + 1]
    acc = take(x.group * x.head_dim);                        // [group][head_dim]
    row_max = take(x.group);
    row_total = take(x.group);
    row_rescale = take(x.group);
    end_base = at;
    // Optional copies of the aligner weights this block reads for every key.
    w1 = take(lisa ? x.aligner.width * x.heads : 0);                 // W1 [width][heads]
    w2 = take(lisa ? x.group * x.aligner.width : 0);                 // the group's rows of W2
    align_a = take(lisa ? x.group * x.heads : 0);            // the group's rows of A
    end = at;
  }
};

__device__ __forceinline__ float silu(float x) {
  // exp of a clamped argument: silu(x) underflows to ~0 there anyway.
  return x / (1.0f + __expf(-fmaxf(x, -80.0f)));
}

template <typename T, bool kLisa>
__global__ void __launch_bounds__(kThreads) lisa_attention_kernel(const LisaArgs args) {
  extern __shared__ float shared[];
  const SharedLayout L(args, kLisa);
  float* q_s = shared + L.q;
  float* k_s = shared + L.k;
  float* v_s = shared + L.v;
  float* a_s = shared + L.a;
  float* hidden_s = shared + L.hidden;
  float* p_s = shared + L.p;
  float* acc_s = shared + L.acc;
  float* row_max = shared + L.row_max;
  float* row_total = shared + L.row_total;
  float* row_rescale = shared + L.row_rescale;
  __shared__ int seq_s;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int t = blockIdx.x, kv_head = blockIdx.y;
  const int group = args.group, heads = args.heads, qk_dim = args.qk_dim, head_dim = args.head_dim;
  const int width = args.aligner.width;
  const int head0 = kv_head * group;
  const int k_stride = odd_stride(qk_dim), a_stride = odd_stride(heads), h_stride = odd_stride(width);
  constexpr int kPStride = kTileKeys + 1;

  // The sequence of row t: the last b with cu_query_lens[b] <= t.
  if (tid == 0) {
    int lo = 0, hi = args.batch - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (args.cu_query_lens[mid] <= t) lo = mid; else hi = mid - 1;
    }
    seq_s = lo;
  }
  // Query rows, aligner weights, accumulators.
  for (int i = tid; i < group * qk_dim; i += kThreads) {
    const int gi = i / qk_dim, c = i % qk_dim;
    q_s[i] = to_float(static_cast<const T*>(args.query)[t * args.query_row_stride +
                                                        static_cast<int64_t>(head0 + gi) * qk_dim + c]);
  }
  for (int i = tid; i < group * head_dim; i += kThreads) acc_s[i] = 0.0f;
  for (int i = tid; i < group; i += kThreads) {
    row_max[i] = -INFINITY;
    row_total[i] = 0.0f;
  }
  const float* w1 = args.aligner.w1;
  const float* w2 = args.aligner.w2 + static_cast<int64_t>(head0) * width;     // rows of the group
  const float* align_a = args.aligner.a + static_cast<int64_t>(head0) * heads; // rows of the group
  if (kLisa && args.weights_in_shared) {
    float* w1_s = shared + L.w1;
    float* w2_s = shared + L.w2;
    float* a_rows_s = shared + L.align_a;
    for (int i = tid; i < width * heads; i += kThreads) w1_s[i] = w1[i];
    for (int i = tid; i < group * width; i += kThreads) w2_s[i] = w2[i];
    for (int i = tid; i < group * heads; i += kThreads) a_rows_s[i] = align_a[i];
    w1 = w1_s;
    w2 = w2_s;
    align_a = a_rows_s;
  }
  __syncthreads();

  const int seq = seq_s;
  const int chunk_start = args.cu_query_lens[seq];
  const int chunk_len = args.cu_query_lens[seq + 1] - chunk_start;
  int64_t key_limit = args.max_blocks * args.block_size;
  if (kLisa) key_limit = min(key_limit, args.prev_keys);
  if (args.scores_out != nullptr) key_limit = min(key_limit, args.out_keys);
  const int64_t seq_len_raw = args.seq_lens[seq * args.seq_lens_stride];
  const int64_t seq_len = min(seq_len_raw, key_limit);
  // Row t at position p sees keys 0..p; a row outside its sequence's chunk sees none.
  const bool in_chunk = t >= chunk_start && t < chunk_start + chunk_len;
  const int64_t position = seq_len_raw - (chunk_start + chunk_len - t);
  const int n_keys = in_chunk ? static_cast<int>(max(static_cast<int64_t>(0), min(position + 1, seq_len))) : 0;

  const int32_t* block_table = args.block_tables + static_cast<int64_t>(seq) * args.max_blocks;
  const T* keys = static_cast<const T*>(args.keys);
  const T* values = static_cast<const T*>(args.values);

  for (int key0 = 0; key0 < n_keys; key0 += kTileKeys) {
    // 1. Key and value rows of the tile (zeros past n_keys or in an invalid block).
    for (int i = tid; i < kTileKeys * qk_dim; i += kThreads) {
      const int c = i / qk_dim, e = i % qk_dim, key = key0 + c;
      float x = 0.0f;
      if (key < n_keys) {
        const int64_t block = block_table[key / args.block_size];
        if (block >= 0 && block < args.num_blocks) {
          const int64_t slot = block * args.block_size + key % args.block_size;
          x = to_float(keys[(slot * args.kv_heads + kv_head) * qk_dim + e]);
        }
      }
      k_s[c * k_stride + e] = x;
    }
    for (int i = tid; i < kTileKeys * head_dim; i += kThreads) {
      const int c = i / head_dim, e = i % head_dim, key = key0 + c;
      float x = 0.0f;
      if (key < n_keys) {
        const int64_t block = block_table[key / args.block_size];
        if (block >= 0 && block < args.num_blocks) {
          const int64_t slot = block * args.block_size + key % args.block_size;
          x = to_float(values[(slot * args.kv_heads + kv_head) * head_dim + e]);
        }
      }
      v_s[c * head_dim + e] = x;
    }
    if (kLisa) {
      // a[c][:] = scores_prev[t, :, key0 + c]; consecutive threads read consecutive keys.
      for (int i = tid; i < heads * kTileKeys; i += kThreads) {
        const int hd = i / kTileKeys, c = i % kTileKeys, key = key0 + c;
        a_s[c * a_stride + hd] =
            key < n_keys ? args.scores_prev[(static_cast<int64_t>(t) * heads + hd) * args.prev_keys + key] : 0.0f;
      }
      __syncthreads();
      // hidden[c][i] = silu(W1[i] . a[c] + b1[i]); a warp shares i (broadcast) across 32 keys.
      for (int i = tid; i < width * kTileKeys; i += kThreads) {
        const int row = i / kTileKeys, c = i % kTileKeys;
        const float* w = w1 + static_cast<int64_t>(row) * heads;
        const float* a = a_s + c * a_stride;
        float s = args.aligner.b1[row];
        for (int e = 0; e < heads; ++e) s += w[e] * a[e];
        hidden_s[c * h_stride + row] = silu(s);
      }
    }
    __syncthreads();

    // 2. Logits of this block's heads; masked keys get -inf (and are not written out).
    for (int i = tid; i < group * kTileKeys; i += kThreads) {
      const int gi = i / kTileKeys, c = i % kTileKeys, key = key0 + c, hd = head0 + gi;
      const float* q = q_s + gi * qk_dim;
      const float* k = k_s + c * k_stride;
      float dot = 0.0f;
      for (int e = 0; e < qk_dim; ++e) dot += q[e] * k[e];
      float s = args.qk_scale * dot;
      if (kLisa) {
        const float* a = a_s + c * a_stride;
        const float* hid = hidden_s + c * h_stride;
        const float* a_row = align_a + static_cast<int64_t>(gi) * heads;
        const float* w2_row = w2 + static_cast<int64_t>(gi) * width;
        float aligned = args.aligner.b2[hd];
        for (int e = 0; e < heads; ++e) aligned += a_row[e] * a[e];
        for (int e = 0; e < width; ++e) aligned += w2_row[e] * hid[e];
        s += aligned;
      }
      const bool visible = key < n_keys;
      if (visible && args.scores_out != nullptr) {
        args.scores_out[(static_cast<int64_t>(t) * heads + hd) * args.out_keys + key] = s;
      }
      p_s[gi * kPStride + c] = visible ? s : -INFINITY;
    }
    __syncthreads();

    // 3a. Online softmax: warp w owns head rows w, w + kWarps, ...; lane c owns key c.
    for (int gi = warp; gi < group; gi += kWarps) {
      const float s = p_s[gi * kPStride + lane];
      float tile_max = s;
      for (int offset = 16; offset > 0; offset /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, offset));
      }
      const float old_max = row_max[gi];
      const float new_max = fmaxf(old_max, tile_max);
      // A row that has seen no visible key yet keeps max -inf: weights 0, nothing to rescale.
      const bool empty = new_max == -INFINITY;
      const float w = empty ? 0.0f : __expf(s - new_max);
      const float sum = warp_sum(w);
      const float rescale = empty ? 1.0f : __expf(old_max - new_max);
      p_s[gi * kPStride + lane] = w;
      __syncwarp();
      if (lane == 0) {
        row_max[gi] = new_max;
        row_rescale[gi] = rescale;
        row_total[gi] = row_total[gi] * rescale + sum;
      }
    }
    __syncthreads();

    // 3b. acc = acc * rescale + P V; each thread owns fixed (head, dim) accumulators.
    for (int i = tid; i < group * head_dim; i += kThreads) {
      const int gi = i / head_dim, e = i % head_dim;
      const float* p = p_s + gi * kPStride;
      float x = acc_s[i] * row_rescale[gi];
#pragma unroll 8
      for (int c = 0; c < kTileKeys; ++c) x += p[c] * v_s[c * head_dim + e];
      acc_s[i] = x;
    }
    __syncthreads();  // the next tile overwrites every tile array
  }

  // A row with no visible key outputs zeros, as the CPU kernel does.
  T* out = static_cast<T*>(args.out) + (static_cast<int64_t>(t) * heads + head0) * head_dim;
  for (int i = tid; i < group * head_dim; i += kThreads) {
    const float total = row_total[i / head_dim];
    out[i] = from_float<T>(total > 0.0f ? acc_s[i] / total : 0.0f);
  }
}

// ---- decode: the aligned logits of every head, four threads per key ----

struct LogitsArgs {
  float* logits;  // [tokens, heads, logits_keys]
  int64_t logits_keys;
  const float* scores_prev;  // [tokens, heads, prev_keys]
  int64_t prev_keys;
  decode::TokenKeys token_keys;
  Aligner aligner;
  int heads;
};

constexpr int kLogitsThreads = 128;
// Threads per key: each owns a quarter of the aligner's hidden units and of the output heads.
// With one thread per key, a decode step at batch 1 and context 512 gave the kernel 512
// threads, each doing the whole 3 x 32 x 32 multiply-adds in turn (21.6 us a LiSA layer on an
// H200 for LLaMA-2-7B's 32 heads, more than the layer's attention).
constexpr int kKeyParts = 4;
constexpr int kLogitsKeys = kLogitsThreads / kKeyParts;  // keys a block takes at once

// Shared floats of the logits kernel: A^T, W1^T and W2^T padded to kMaxHeads x kMaxHeads with
// zeros (so every loop has a compile-time bound and reads four weights per 16-byte load), b1
// and b2.
int logits_shared_floats(int max_heads) { return 3 * max_heads * max_heads + 2 * max_heads; }

// The variant for `heads` heads and an aligner `width` wide: 0 when none holds them.
int logits_max_heads(int64_t heads, int64_t width) {
  const int64_t n = std::max(heads, width);
  return n <= 16 ? 16 : n <= 32 ? 32 : 0;
}

// A compiler barrier: the loads after it stay after it. The weights are the same for every
// key, and without it the compiler hoists them out of the key loop into registers, which
// spill.
__device__ __forceinline__ void keep_loads_here() { asm volatile("" ::: "memory"); }

// acc[i] += w[i] * x for i < K (a multiple of 4), w read four at a time.
template <int K>
__device__ __forceinline__ void add_scaled(float (&acc)[K], const float4* w, float x) {
#pragma unroll
  for (int i = 0; i < K / 4; ++i) {
    const float4 v = w[i];
    acc[4 * i] += v.x * x;
    acc[4 * i + 1] += v.y * x;
    acc[4 * i + 2] += v.z * x;
    acc[4 * i + 3] += v.w * x;
  }
}

// The aligned logits (A a + W2 silu(W1 a + b1) + b2)[hd] with a = scores_prev[t, :, j], for
// the keys j visible to token t (the low-rank delta is added by the split kernel). Grid
// (tokens, key blocks). Part p (of kKeyParts threads of one key, adjacent lanes) computes the
// hidden units and the output heads [p K/4, (p+1) K/4): A a + b2 for its heads and its hidden
// units, then their share of W2 h for every head, summed over the four parts by two shuffle
// rounds that each halve what a part keeps (a reduce-scatter). The weights are read from
// shared memory.
template <int kMaxHeads>
__global__ void __launch_bounds__(kLogitsThreads) lisa_decode_logits_kernel(const LogitsArgs args) {
  constexpr int K = kMaxHeads, K4 = kMaxHeads / 4, Q = kMaxHeads / kKeyParts;  // Q: units per part
  static_assert(kKeyParts == 4 && Q % 4 == 0, "a part's units and heads are whole 16-byte pieces");
  extern __shared__ float4 shared4[];
  float* shared = reinterpret_cast<float*>(shared4);
  const int heads = args.heads, width = args.aligner.width, t = blockIdx.x;
  int seq;
  const int n_keys = decode::visible_keys(args.token_keys, t, &seq);
  // A graph's grid covers the longest context it serves: a block past this token's keys has
  // nothing to do, so it leaves before loading the weights (the whole block alike, before any
  // barrier).
  if (static_cast<int>(blockIdx.y) * kLogitsKeys >= n_keys) return;
  float* at_s = shared;           // A^T  [c][h] = A[h][c]
  float* w1t_s = at_s + K * K;    // W1^T [c][m] = W1[m][c]
  float* w2t_s = w1t_s + K * K;   // W2^T [m][h] = W2[h][m]
  float* b1_s = w2t_s + K * K;    // [K]
  float* b2_s = b1_s + K;         // [K]
  for (int i = threadIdx.x; i < K * K; i += kLogitsThreads) {
    const int r = i / K, c = i % K;  // row r, column c of the transposed matrices
    at_s[i] = r < heads && c < heads ? args.aligner.a[c * heads + r] : 0.0f;
    w1t_s[i] = r < heads && c < width ? args.aligner.w1[c * heads + r] : 0.0f;
    // The four parts read four rows of W2^T at once, at the same column: the rows of part p
    // have their 16-byte pieces permuted by p (piece j stored at j ^ p), so the four reads fall
    // in different banks.
    w2t_s[r * K + 4 * ((c / 4) ^ (r / Q)) + c % 4] = r < width && c < heads ? args.aligner.w2[c * width + r] : 0.0f;
  }
  for (int i = threadIdx.x; i < K; i += kLogitsThreads) {
    b1_s[i] = i < width ? args.aligner.b1[i] : 0.0f;
    b2_s[i] = i < heads ? args.aligner.b2[i] : 0.0f;
  }
  __syncthreads();
  const int part = threadIdx.x % kKeyParts, first = part * Q;  // this part's units and heads
  const float4* at4 = reinterpret_cast<const float4*>(at_s);
  const float4* w1t4 = reinterpret_cast<const float4*>(w1t_s);
  const float4* w2t4 = reinterpret_cast<const float4*>(w2t_s);

  const float* prev = args.scores_prev + static_cast<int64_t>(t) * heads * args.prev_keys;
  float* logits = args.logits + static_cast<int64_t>(t) * heads * args.logits_keys;
  // The loop is the same for the whole block (the shuffles need every lane of a warp).
  for (int base = blockIdx.y * kLogitsKeys; base < n_keys; base += gridDim.y * kLogitsKeys) {
    keep_loads_here();
    const int key = base + threadIdx.x / kKeyParts;
    const bool valid = key < n_keys;
    float a[K], hidden[Q], own[Q];
#pragma unroll
    for (int c = 0; c < K; ++c) a[c] = valid && c < heads ? prev[c * args.prev_keys + key] : 0.0f;
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      hidden[i] = b1_s[first + i];
      own[i] = b2_s[first + i];
    }
    // This part's hidden units, W1 a + b1, and its heads' A a + b2, one column at a time
    // (a is not needed after these: fewer registers live below).
#pragma unroll
    for (int c = 0; c < K; ++c) {
      add_scaled(hidden, w1t4 + c * K4 + first / 4, a[c]);
      add_scaled(own, at4 + c * K4 + first / 4, a[c]);
    }
    // The hidden units' share of W2 silu(hidden) for every head (padded units: silu(0) = 0).
    float s[K];
#pragma unroll
    for (int c = 0; c < K; ++c) s[c] = 0.0f;
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      const float4* row = w2t4 + (first + i) * K4;
      const float x = silu(hidden[i]);
#pragma unroll
      for (int j = 0; j < K4; ++j) {
        const float4 v = row[j ^ part];  // (the permuted pieces, see above)
        s[4 * j] += v.x * x;
        s[4 * j + 1] += v.y * x;
        s[4 * j + 2] += v.z * x;
        s[4 * j + 3] += v.w * x;
      }
    }
    // Reduce-scatter over the four parts: keep the half of the heads that holds this part's
    // quarter and add the partner's copy of it, then the same within that half.
    constexpr int H = K / 2;
    const bool upper = part & 2;
    float half[H];
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float give = upper ? s[i] : s[H + i];
      half[i] = (upper ? s[H + i] : s[i]) + __shfl_xor_sync(kFullMask, give, 2);
    }
    const bool upper_quarter = part & 1;
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      const float give = upper_quarter ? half[i] : half[Q + i];
      own[i] += (upper_quarter ? half[Q + i] : half[i]) + __shfl_xor_sync(kFullMask, give, 1);
    }
#pragma unroll
    for (int i = 0; i < Q; ++i) {
      if (valid && first + i < heads) logits[(first + i) * args.logits_keys + key] = own[i];
    }
  }
}

// Whether a LiSA call takes the decode path: decode-shaped (a token per sequence) and an
// aligner small enough for the logits kernel (at most 32 heads and 32 wide; larger ones take
// the tiled kernel, correct but slower).
bool lisa_decode_path(int64_t num_tokens, int64_t batch, int64_t heads, int64_t width) {
  return num_tokens == batch && logits_max_heads(heads, width) > 0;
}

int64_t lisa_key_limit(const PagedKVCache& cache, int64_t prev_keys, bool has_scores_out, int64_t out_keys) {
  int64_t limit = std::min(cache.max_blocks * cache.block_size, prev_keys);
  return has_scores_out ? std::min(limit, out_keys) : limit;
}

cudaError_t launch_lisa_logits(const LogitsArgs& args, int64_t num_tokens, cudaStream_t stream) {
  const int max_heads = logits_max_heads(args.heads, args.aligner.width);
  const size_t bytes = static_cast<size_t>(logits_shared_floats(max_heads)) * sizeof(float);
  // Enough key blocks to cover the longest context, or to give every SM a few blocks.
  const int64_t wanted = (4 * static_cast<int64_t>(decode::sm_count()) + num_tokens - 1) / num_tokens;
  const int64_t needed = (args.token_keys.key_limit + kLogitsKeys - 1) / kLogitsKeys;
  const dim3 grid(static_cast<unsigned>(num_tokens),
                  static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, needed))));
  if (max_heads == 16) {
    lisa_decode_logits_kernel<16><<<grid, kLogitsThreads, bytes, stream>>>(args);
  } else {
    lisa_decode_logits_kernel<32><<<grid, kLogitsThreads, bytes, stream>>>(args);
  }
  return cudaGetLastError();
}

template <bool kLisa>
cudaError_t launch(LisaArgs args, DType dtype, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.batch == 0 || args.kv_heads == 0 || args.group == 0) return cudaSuccess;
  int device = 0, max_shared = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  // Reserve room for the static shared variables.
  const int64_t budget = static_cast<int64_t>(max_shared) - 1024;
  args.weights_in_shared = false;
  SharedLayout layout(args, kLisa);
  if (kLisa && static_cast<int64_t>(layout.end) * 4 <= budget) args.weights_in_shared = true;
  const int64_t bytes = static_cast<int64_t>(args.weights_in_shared ? layout.end : layout.end_base) * 4;
  if (bytes > budget) return cudaErrorInvalidConfiguration;  // shapes too large for one block
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = lisa_attention_kernel<T, kLisa>;
    if (bytes > 48 * 1024) {
      // Beyond 48 KiB dynamic shared memory needs an opt-in (a host attribute, no stream work).
      const cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
      if (e != cudaSuccess) return e;
    }
    const dim3 grid(static_cast<unsigned>(args.num_tokens), static_cast<unsigned>(args.kv_heads));
    kernel<<<grid, kThreads, static_cast<size_t>(bytes), stream>>>(args);
    return cudaGetLastError();
  });
}

LisaArgs common_args(void* out, const void* query, int64_t query_row_stride, int64_t num_tokens,
                     int64_t num_heads, int64_t batch, const PagedKVCache& cache, int64_t qk_dim,
                     const int32_t* cu_query_lens, const int32_t* seq_lens, int64_t seq_lens_stride,
                     float qk_scale, float* scores_out, int64_t out_keys) {
  LisaArgs a{};
  a.out = out;
  a.query = query;
  a.query_row_stride = query_row_stride;
  a.keys = cache.keys;
  a.values = cache.values;
  a.block_tables = cache.block_tables;
  a.max_blocks = cache.max_blocks;
  a.block_size = cache.block_size;
  a.num_blocks = cache.num_blocks;
  a.cu_query_lens = cu_query_lens;
  a.seq_lens = seq_lens;
  a.seq_lens_stride = seq_lens_stride;
  a.num_tokens = static_cast<int>(num_tokens);
  a.batch = static_cast<int>(batch);
  a.heads = static_cast<int>(num_heads);
  a.kv_heads = static_cast<int>(cache.kv_heads);
  a.group = cache.kv_heads > 0 ? static_cast<int>(num_heads / cache.kv_heads) : 0;
  a.qk_dim = static_cast<int>(qk_dim);
  a.head_dim = static_cast<int>(cache.head_dim);
  a.qk_scale = qk_scale;
  a.scores_out = scores_out;
  a.out_keys = out_keys;
  return a;
}

}  // namespace

int64_t paged_attention_scores_workspace(int64_t num_tokens, int64_t num_heads, int64_t batch,
                                         const PagedKVCache& cache, int64_t max_keys) {
  if (num_tokens != batch) return 0;
  const int64_t limit = std::min(cache.max_blocks * cache.block_size, max_keys);
  return decode::plan(num_tokens, num_heads, cache.kv_heads, cache.head_dim, limit).partial_floats * 4;
}

cudaError_t paged_attention_scores(void* out, float* scores, int64_t max_keys, const void* query,
                                   int64_t query_row_stride, int64_t num_tokens, int64_t num_heads,
                                   int64_t batch, const PagedKVCache& cache, const int32_t* cu_query_lens,
                                   const int32_t* seq_lens, int64_t seq_lens_stride, float scale,
                                   void* workspace, DType dtype, cudaStream_t stream) {
  if (num_tokens == batch) {
    const decode::TokenKeys keys{cu_query_lens, seq_lens, seq_lens_stride, static_cast<int>(batch),
                                 std::min(cache.max_blocks * cache.block_size, max_keys)};
    decode::Launch x(out, num_tokens, num_heads, cache, keys, query, query_row_stride, scale, workspace);
    x.logits_out = scores;
    x.logits_out_keys = max_keys;
    return decode::launch(x, dtype, stream);
  }
  const LisaArgs args = common_args(out, query, query_row_stride, num_tokens, num_heads, batch, cache,
                                    cache.head_dim, cu_query_lens, seq_lens, seq_lens_stride, scale, scores,
                                    max_keys);
  return launch<false>(args, dtype, stream);
}

int64_t lisa_attention_workspace(int64_t num_tokens, int64_t num_heads, int64_t batch, const PagedKVCache& cache,
                                 int64_t width, int64_t prev_keys, bool has_scores_out, int64_t out_keys) {
  if (!lisa_decode_path(num_tokens, batch, num_heads, width)) return 0;
  const int64_t limit = lisa_key_limit(cache, prev_keys, has_scores_out, out_keys);
  const int64_t logits = has_scores_out ? 0 : num_tokens * num_heads * limit;
  return (logits + decode::plan(num_tokens, num_heads, cache.kv_heads, cache.head_dim, limit).partial_floats) * 4;
}

cudaError_t lisa_attention(void* out, float* scores_out, int64_t out_keys, const float* scores_prev,
                           int64_t prev_keys, const void* query_lr, int64_t query_row_stride, int64_t rank,
                           int64_t num_tokens, int64_t num_heads, int64_t batch, const PagedKVCache& cache,
                           const int32_t* cu_query_lens, const int32_t* seq_lens, int64_t seq_lens_stride,
                           const float* align_a, const float* align_w1, const float* align_b1,
                           const float* align_w2, const float* align_b2, int64_t width, float delta_scale,
                           void* workspace, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || batch == 0 || num_heads == 0 || cache.kv_heads == 0) return cudaSuccess;
  const Aligner aligner{align_a, align_w1, align_b1, align_w2, align_b2, static_cast<int>(width)};
  if (lisa_decode_path(num_tokens, batch, num_heads, width)) {
    const int64_t limit = lisa_key_limit(cache, prev_keys, scores_out != nullptr, out_keys);
    const decode::TokenKeys token_keys{cu_query_lens, seq_lens, seq_lens_stride, static_cast<int>(batch), limit};
    // The aligned logits go to scores_out when the next layer wants them (the split kernel
    // then adds the delta in place), else to the workspace.
    float* logits = scores_out != nullptr ? scores_out : static_cast<float*>(workspace);
    const int64_t logits_keys = scores_out != nullptr ? out_keys : limit;
    LogitsArgs la{};
    la.logits = logits;
    la.logits_keys = logits_keys;
    la.scores_prev = scores_prev;
    la.prev_keys = prev_keys;
    la.token_keys = token_keys;
    la.aligner = aligner;
    la.heads = static_cast<int>(num_heads);
    const cudaError_t err = launch_lisa_logits(la, num_tokens, stream);
    if (err != cudaSuccess) return err;
    // The split kernel's scratch follows the logits scratch.
    float* partials = static_cast<float*>(workspace) + (scores_out != nullptr ? 0 : num_tokens * num_heads * limit);
    decode::Launch x(out, num_tokens, num_heads, cache, token_keys, query_lr, query_row_stride, delta_scale, partials);
    x.key_dim = rank;
    x.logits_in = logits;
    x.logits_in_keys = logits_keys;
    x.logits_out = scores_out;
    x.logits_out_keys = out_keys;
    return decode::launch(x, dtype, stream);
  }
  LisaArgs args = common_args(out, query_lr, query_row_stride, num_tokens, num_heads, batch, cache, rank,
                              cu_query_lens, seq_lens, seq_lens_stride, delta_scale, scores_out, out_keys);
  args.scores_prev = scores_prev;
  args.prev_keys = prev_keys;
  args.aligner = aligner;
  return launch<true>(args, dtype, stream);
}

}  // namespace lisa_rt::kernels
