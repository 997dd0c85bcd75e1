// Decode-shaped attention (about one query per sequence) split over the context.
//
// The tiled kernels of attention.cu and lisa_attention.cu give a block one query row and one
// KV head and walk the whole context through shared memory: right for prefill chunks, where a
// K/V tile serves many rows, but a decode step has one row per sequence, and there a block
// streamed a few hundred keys one tile after another while most of the GPU sat idle (one
// layer of LLaMA-2-7B-shaped attention at batch 1, context 512: 104 us for 8 MB of cache).
//
// Here a block owns one query token, the heads of one KV head's group (up to 8 of them, so a
// K/V row is read once for all of them), and one split of the token's visible keys; splits
// are many when tokens x KV heads are few. Lanes hold 8 consecutive dims of a row: a K/V row
// of head_dim d is read by d/8 adjacent lanes in 16-byte loads, a warp covers 32/(d/8) keys at
// once, and each lane group keeps its own online softmax (max, sum, P V in the log2 domain)
// for every head of the block, merged across the warp by shuffles and across the block's
// warps in shared memory. With one split the block writes the output; otherwise it writes its
// split's normalised output, max and sum, and a second kernel merges the splits.
//
// The logits are scale * q . k (full attention; optionally written out for a following LiSA
// layer), plus, for LiSA, the aligned logits that lisa_decode_logits_kernel wrote to a float32
// buffer before (the head aligner mixes all heads of a key); then q . k is the low-rank delta
// q' . k' over rank dims.
//
// Nothing here allocates: plan() sizes the scratch, and the torch binding takes it from
// torch's caching allocator, which a CUDA graph capture also serves.
//
// Measured on an H200 (BENCHMARKS.md, 2026-11-27): at batch 32 and context 2048 the kernel
// moved about 1.8 TB/s, 40% of the card's bandwidth, bound by latency, not bytes, which is why
// LiSA's smaller cache did not make its layers faster. Each step then read its block-table
// entries, then its rows, then (LiSA) its given logits, one round trip after another; the
// entries are now read a step ahead and the rest issued together (not yet run on a GPU).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cuda/decode_attention.h"
#include "device.cuh"

namespace lisa_rt::kernels::decode {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadsPerBlock = 8;
constexpr int kMinSplitKeys = 32;  // a split shorter than this costs more to merge than it saves
constexpr int kMaxSplits = 64;     // splits per token: enough to fill the GPU at batch 1
constexpr float kLog2e = 1.4426950408889634f;

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

struct SplitArgs {
  void* out;               // [tokens, heads, head_dim] contiguous
  float* partial_out;      // [tokens, heads, splits, head_dim], each split's normalised output
  float* partial_max;      // [tokens, heads, splits], log2 domain
  float* partial_sum;      // [tokens, heads, splits]
  const void* query;       // [tokens, heads, key_dim], rows query_row_stride apart
  int64_t query_row_stride;
  const float* logits_in;  // optional logits added to scale * q . k: [tokens, heads, logits_in_keys]
  int64_t logits_in_keys;
  float* logits_out;       // optional: the logits, [tokens, heads, logits_out_keys]
  int64_t logits_out_keys;
  PagedKVCache cache;      // values [.., kv_heads, head_dim]; keys [.., kv_heads, key_dim]
  TokenKeys keys;
  int key_dim;
  int num_heads;
  int group;               // query heads per KV head
  int head_chunks;         // blocks per KV head: ceil(group / heads per block)
  int splits;
  float scale;             // logits = logits_in + scale * q . k
  bool keys_vectorised;    // key rows may be read in 16-byte vectors
  bool values_vectorised;  // value rows likewise
};

// Splits actually used for a token that sees n keys: none shorter than kMinSplitKeys.
__device__ __forceinline__ int splits_for(int splits, int n_keys) {
  return min(splits, max(1, ceil_div_dev(n_keys, kMinSplitKeys)));
}

// Up to eight elements of a row starting at src: `count` of them (zeros after), in 16-byte
// loads when all eight are wanted and `vectorised`.
template <typename T>
__device__ __forceinline__ Vec<T, 8> load_part8(const T* src, int count, bool vectorised) {
  if (count >= 8) return load_row8(src, true, vectorised);
  Vec<T, 8> v;
#pragma unroll
  for (int k = 0; k < 8; ++k) v.data[k] = k < count ? src[k] : from_float<T>(0.0f);
  return v;
}

// (m, l, acc) absorbs (m2, l2, acc2): two online-softmax states over disjoint keys.
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[8], float m2, float l2,
                                            const float (&acc2)[8]) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) return;  // both saw no key
  const float c1 = exp2f(m - top), c2 = exp2f(m2 - top);
  l = l * c1 + l2 * c2;
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = acc[e] * c1 + acc2[e] * c2;
  m = top;
}

// Blocks per SM the register budget is held to (ptxas for sm_90: 110-128 registers a thread
// with 1-4 heads, 150-160 for 2-4 heads with given logits, which spill at 4 blocks; 240-246
// for 8 heads).
template <int kHeads, bool kLogitsIn>
constexpr int kMinBlocks = kHeads >= 8 ? 2 : kLogitsIn && kHeads >= 2 ? 3 : 4;

template <typename T, int kLanes, int kHeads, bool kLogitsIn>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<kHeads, kLogitsIn>)) split_kernel(const SplitArgs args) {
  constexpr int kGroupsPerWarp = 32 / kLanes;       // keys a warp covers at once
  constexpr int kGroups = kWarps * kGroupsPerWarp;  // lane groups in the block
  constexpr int kUnroll = kHeads >= 4 ? 2 : 4;      // keys per group per step: loads in flight
  constexpr int kRowDims = kLanes * 8;
  __shared__ float warp_max[kWarps][kHeads], warp_sum[kWarps][kHeads];
  __shared__ float warp_acc[kWarps][kHeads][kRowDims];

  const int t = blockIdx.x, split = blockIdx.z;
  const int kv_head = blockIdx.y / args.head_chunks;
  const int first_in_group = (blockIdx.y % args.head_chunks) * kHeads;
  const int heads_here = min(kHeads, args.group - first_in_group);
  const int head0 = kv_head * args.group + first_in_group;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % kLanes, group_id = warp * kGroupsPerWarp + lane / kLanes;
  const PagedKVCache& cache = args.cache;
  const int head_dim = static_cast<int>(cache.head_dim), key_dim = args.key_dim;
  const int block_size = static_cast<int>(cache.block_size);
  const int dim0 = sub * 8;
  const bool values_ok = dim0 < head_dim;
  const int key_count = min(8, max(0, key_dim - dim0));  // of this lane's 8 key dims

  int seq;
  const int n_keys = visible_keys(args.keys, t, &seq);
  const int splits_used = splits_for(args.splits, n_keys);
  if (split >= splits_used) return;  // the combine reads only the splits in use
  const int per_split = ceil_div_dev(n_keys, splits_used);
  const int key_begin = split * per_split, key_end = min(n_keys, key_begin + per_split);
  const int64_t row = static_cast<int64_t>(t) * args.num_heads + head0;  // (token, first head) row

  float q[kHeads][8];
  {
    const T* query = static_cast<const T*>(args.query) + t * args.query_row_stride;
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        q[h][e] = h < heads_here && e < key_count ? to_float(query[(head0 + h) * key_dim + dim0 + e]) : 0.0f;
      }
    }
  }
  float m[kHeads], l[kHeads], acc[kHeads][8];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.0f;
  }

  const int32_t* table = cache.block_tables + static_cast<int64_t>(seq) * cache.max_blocks;
  const T* keys = static_cast<const T*>(args.cache.keys);
  const T* values = static_cast<const T*>(args.cache.values);
  // A step's loads depend on its block-table entries. Read in turn, the entries and then the
  // rows cost two memory round trips per step; here a step's entries are read one step ahead,
  // while the step before computes, so a step waits on one round trip: its key, value (and
  // given logit) loads, all issued together.
  constexpr int kStride = kGroups * kUnroll;  // keys the block covers per step
  struct Lookup {                             // where the group's keys of one step live
    int key0;
    int32_t block[kUnroll];                   // the table entries; -1 past the split
    int in_block[kUnroll];
  };
  struct Rows {                               // the group's loads of one step
    Vec<T, 8> k[kUnroll], v[kUnroll];
    float given[kUnroll][kHeads];
  };
  // The group's keys are consecutive: one 32-bit division per step finds their blocks.
  auto look_up = [&](int step) {
    Lookup x;
    x.key0 = step + group_id * kUnroll;
    int table_index = x.key0 / block_size, in_block = x.key0 - table_index * block_size;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      x.block[u] = x.key0 + u < key_end ? table[table_index] : -1;
      x.in_block[u] = in_block;
      if (++in_block == block_size) {
        in_block = 0;
        ++table_index;
      }
    }
    return x;
  };
  auto fetch = [&](const Lookup& x) {
    Rows r;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      int64_t slot = -1;  // keys past the split, and keys in an invalid block, read as zeros
      if (x.block[u] >= 0 && x.block[u] < cache.num_blocks) {
        slot = static_cast<int64_t>(x.block[u]) * block_size + x.in_block[u];
      }
      const int64_t row_index = slot * cache.kv_heads + kv_head;
      r.k[u] = load_part8(keys + (slot >= 0 ? row_index * key_dim + dim0 : 0), slot >= 0 ? key_count : 0,
                          args.keys_vectorised);
      r.v[u] = load_row8(values + (slot >= 0 ? row_index * head_dim + dim0 : 0), slot >= 0 && values_ok,
                         args.values_vectorised);
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        r.given[u][h] = 0.0f;
        if constexpr (kLogitsIn) {
          // (logits_out may be logits_in: each of these logits is read by this group alone and
          // written by its first lane later in this step, after the __syncwarp below)
          if (x.key0 + u < key_end && h < heads_here) {
            r.given[u][h] = args.logits_in[(row + h) * args.logits_in_keys + x.key0 + u];
          }
        }
      }
    }
    return r;
  };

  // Every lane runs the same number of steps (the shuffles below need the whole warp).
  Lookup here{};
  if (key_begin < key_end) here = look_up(key_begin);
  for (int step = key_begin; step < key_end; step += kStride) {
    const int key0 = here.key0;
    Lookup ahead{};
    if (step + kStride < key_end) ahead = look_up(step + kStride);  // the same for the whole block
    const Rows rows = fetch(here);
    // Every lane of a group has read the given logits; where logits_out is logits_in, one lane
    // overwrites them below. Program order alone does not order other lanes' reads before that
    // write (a shuffle is not a memory barrier); this barrier does.
    if constexpr (kLogitsIn) __syncwarp();
    // Logits of the step's keys in the log2 domain; -inf for keys past the split.
    float s[kUnroll][kHeads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int key = key0 + u;
      const bool valid = key < key_end;
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += q[h][e] * to_float(rows.k[u].data[e]);
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
        const float logit = rows.given[u][h] + dot * args.scale;
        if (args.logits_out != nullptr && valid && sub == 0 && h < heads_here) {
          args.logits_out[(row + h) * args.logits_out_keys + key] = logit;
        }
        s[u][h] = valid && h < heads_here ? logit * kLog2e : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float top = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) top = fmaxf(top, s[u][h]);
      if (top == -INFINITY) continue;
      const float rescale = exp2f(m[h] - top);
      l[h] *= rescale;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] *= rescale;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float p = exp2f(s[u][h] - top);
        l[h] += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] += p * to_float(rows.v[u].data[e]);
      }
      m[h] = top;
    }
    here = ahead;
  }
  // Merge the warp's lane groups (lanes with the same dims), then the warps.
#pragma unroll
  for (int offset = kLanes; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float other[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) other[e] = __shfl_xor_sync(kFullMask, acc[h][e], offset);
      const float m2 = __shfl_xor_sync(kFullMask, m[h], offset);
      const float l2 = __shfl_xor_sync(kFullMask, l[h], offset);
      merge_state(m[h], l[h], acc[h], m2, l2, other);
    }
  }
  if (lane < kLanes) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) warp_acc[warp][h][dim0 + e] = acc[h][e];
      if (lane == 0) {
        warp_max[warp][h] = m[h];
        warp_sum[warp][h] = l[h];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads_here * head_dim; i += kThreads) {
    const int h = i / head_dim, d = i % head_dim;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_max[w][h]);
    float total = 0.0f, value = 0.0f;
    if (top != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float c = exp2f(warp_max[w][h] - top);
        total += warp_sum[w][h] * c;
        value += warp_acc[w][h][d] * c;
      }
    }
    // A row with no visible key outputs zeros, as the CPU kernel does.
    const float normalised = total > 0.0f ? value / total : 0.0f;
    if (args.splits == 1) {
      static_cast<T*>(args.out)[(row + h) * head_dim + d] = from_float<T>(normalised);
    } else {
      const int64_t at = (row + h) * args.splits + split;
      args.partial_out[at * head_dim + d] = normalised;
      if (d == 0) {
        args.partial_max[at] = top;
        args.partial_sum[at] = total;
      }
    }
  }
}

// out[t, hd] = the used splits' outputs weighted by their softmax mass. Grid (tokens, heads);
// warp 0 turns the splits' (max, sum) into weights, then every thread sums its dims.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const SplitArgs args) {
  __shared__ float weight[kMaxSplits];
  __shared__ float inv_total;
  const int t = blockIdx.x;
  const int64_t row = static_cast<int64_t>(t) * args.num_heads + blockIdx.y;
  int seq;
  const int used = splits_for(args.splits, visible_keys(args.keys, t, &seq));
  const int head_dim = static_cast<int>(args.cache.head_dim);
  const float* partial = args.partial_out + row * args.splits * head_dim;
  if (used == 1) {
    // One split's output is already normalised: copied as it is, it has the bits a launch of one
    // split writes directly (rescaling it by its own mass rounds). A CUDA graph's block table is
    // wider than an eager step's, which can plan one split where the graph plans several.
    for (int d = threadIdx.x; d < head_dim; d += kThreads) {
      static_cast<T*>(args.out)[row * head_dim + d] = from_float<T>(partial[d]);
    }
    return;  // (used is the same for the whole block: no thread is left at the barrier below)
  }
  const float* maxes = args.partial_max + row * args.splits;
  const float* sums = args.partial_sum + row * args.splits;
  if (threadIdx.x < 32) {
    constexpr int kPerLane = kMaxSplits / 32;
    float m[kPerLane], w[kPerLane];
    float top = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int s = threadIdx.x + 32 * i;
      const bool ok = s < used && sums[s] > 0.0f;
      m[i] = ok ? maxes[s] : -INFINITY;
      w[i] = ok ? sums[s] : 0.0f;
      top = fmaxf(top, m[i]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(kFullMask, top, offset));
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      w[i] = w[i] > 0.0f ? w[i] * exp2f(m[i] - top) : 0.0f;
      total += w[i];
      weight[threadIdx.x + 32 * i] = w[i];
    }
    total = warp_sum(total);
    if (threadIdx.x == 0) inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float value = 0.0f;
#pragma unroll 8
    for (int s = 0; s < used; ++s) value += weight[s] * partial[s * head_dim + d];
    static_cast<T*>(args.out)[row * head_dim + d] = from_float<T>(value * inv_total);
  }
}

// Heads of one KV head's group a block takes (the K/V rows it reads serve them all): the
// smallest variant that holds the group, at most 8.
int heads_per_block(int64_t group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kMaxHeadsPerBlock; }

}  // namespace

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1) {
    return 132;  // an H100's; only how work is divided depends on it
  }
  return count;
}

Plan plan(int64_t num_tokens, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t max_keys) {
  Plan p{};
  if (num_tokens <= 0 || kv_heads <= 0 || num_heads <= 0) return p;
  const int64_t group = num_heads / kv_heads;
  p.head_chunks = ceil_div(group, heads_per_block(group));
  // Tokens counted as the power of two at or above: a CUDA graph pads its batch up to a captured
  // size (lisa_rt/cuda_graph.py keeps every power of two among them), so the eager step of a
  // batch and the graph step it is padded to split each token's keys alike and give the same
  // logits bit for bit; split by the exact count, their rounding differed past a few hundred keys.
  int64_t bucket = 1;
  while (bucket < num_tokens) bucket *= 2;
  const int64_t units = bucket * kv_heads * p.head_chunks;
  // About four blocks per SM in all; never splits shorter than kMinSplitKeys.
  const int64_t wanted = ceil_div(4 * static_cast<int64_t>(sm_count()), units);
  const int64_t longest = ceil_div(std::max<int64_t>(max_keys, 1), kMinSplitKeys);
  p.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, longest, kMaxSplits})));
  p.partial_floats = p.splits > 1 ? num_tokens * num_heads * p.splits * (head_dim + 2) : 0;
  return p;
}

cudaError_t launch(const Launch& x, DType dtype, cudaStream_t stream) {
  if (x.num_tokens == 0 || x.num_heads == 0 || x.cache.kv_heads == 0) return cudaSuccess;
  const Plan p = plan(x.num_tokens, x.num_heads, x.cache.kv_heads, x.cache.head_dim, x.keys.key_limit);
  SplitArgs args{};
  args.out = x.out;
  const int64_t partial_rows = x.num_tokens * x.num_heads * p.splits;
  args.partial_out = x.workspace;
  args.partial_max = x.workspace + partial_rows * x.cache.head_dim;
  args.partial_sum = args.partial_max + partial_rows;
  args.query = x.query;
  args.query_row_stride = x.query_row_stride;
  args.logits_in = x.logits_in;
  args.logits_in_keys = x.logits_in_keys;
  args.logits_out = x.logits_out;
  args.logits_out_keys = x.logits_out_keys;
  args.cache = x.cache;
  args.keys = x.keys;
  args.key_dim = static_cast<int>(x.key_dim > 0 ? x.key_dim : x.cache.head_dim);
  args.num_heads = static_cast<int>(x.num_heads);
  args.group = static_cast<int>(x.num_heads / x.cache.kv_heads);
  args.head_chunks = p.head_chunks;
  args.splits = p.splits;
  args.scale = x.scale;
  // Row offsets are multiples of 8 elements when the row width is, so aligned bases keep
  // every 16-byte piece aligned.
  args.keys_vectorised = args.key_dim % 8 == 0 && is_aligned(x.cache.keys, 16);
  args.values_vectorised = is_aligned(x.cache.values, 16);
  // Tokens on x: the only dimension whose size has no small bound.
  const dim3 grid(static_cast<unsigned>(x.num_tokens), static_cast<unsigned>(x.cache.kv_heads * p.head_chunks),
                  static_cast<unsigned>(p.splits));
  const int heads = heads_per_block(args.group);
  const int64_t d = std::max<int64_t>(x.cache.head_dim, args.key_dim);  // lanes cover the wider row
  const bool logits_in = x.logits_in != nullptr;
  cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto lanes_tag) {
      constexpr int kLanes = decltype(lanes_tag)::value;
      auto with_heads = [&](auto heads_tag) {
        constexpr int kHeads = decltype(heads_tag)::value;
        if (logits_in) {
          split_kernel<T, kLanes, kHeads, true><<<grid, kThreads, 0, stream>>>(args);
        } else {
          split_kernel<T, kLanes, kHeads, false><<<grid, kThreads, 0, stream>>>(args);
        }
        return cudaGetLastError();
      };
      switch (heads) {
        case 1: return with_heads(std::integral_constant<int, 1>{});
        case 2: return with_heads(std::integral_constant<int, 2>{});
        case 4: return with_heads(std::integral_constant<int, 4>{});
        default: return with_heads(std::integral_constant<int, kMaxHeadsPerBlock>{});
      }
    };
    if (d <= 64) return go(std::integral_constant<int, 8>{});
    if (d <= 128) return go(std::integral_constant<int, 16>{});
    return go(std::integral_constant<int, 32>{});
  });
  if (err != cudaSuccess || p.splits == 1) return err;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    combine_kernel<T><<<dim3(static_cast<unsigned>(x.num_tokens), static_cast<unsigned>(x.num_heads)), kThreads, 0,
                        stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace lisa_rt::kernels::decode
