// LiSA attention (DESIGN section 3) on the CPU, and the full attention that also emits its
// logits for a following LiSA layer. Packed query chunks over the paged cache, as
// paged_prefill_attention: query row t of sequence b sits at position
// p = seq_lens[b] - (cu[b+1] - t) and sees keys 0..p. All arithmetic is float32.
//
// LiSA's logits: the aligner mixes heads, so for each (t, j) the whole h-vector
// a = scores_prev[t, :, j] is mapped at once, S[:, j] = A a + W2 silu(W1 a + b1) + b2, then the
// low-rank delta is added per head. In decode (one query per sequence, at its end) one work item
// per run of a sequence's keys computes them and then the run's softmax and P V
// (decode_split_avx2), so that the run's logits never leave the item. Otherwise a work item is
// a tile of query rows (paged.h, kTileRows; several where a chunk's values were widened, AVX2
// types and widths, else one): its logits for every head, into scores_out when given (else a
// buffer of the thread's own), then softmax over j <= p and P V for each KV head. (With too
// few tiles to busy every thread, the logits and the softmax and P V are two passes instead.)
// The full attention that emits its logits decodes the same way (q . K for logits). In a
// prefill chunk the logits of the keys before the chunk, which all its rows see, are matrix
// products (shared_key_logits); a work item is a tile for one KV head's group of heads (or one
// head), its causal band of keys done a key block at a time, then softmax and P V.
#include <algorithm>
#include <cmath>
#include <vector>

#include "head_align.h"
#include "paged.h"

namespace lisa_rt {
namespace {

// Per-row facts of a packed-chunk call: sequence and number of visible keys (p + 1).
struct Rows {
  std::vector<int64_t> seq, n_keys;
};

Rows chunk_rows(const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                int64_t block_size, int64_t tokens, int64_t max_keys, const char* op) {
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t batch = seq_lens.size(0), capacity = block_tables.size(1) * block_size;
  TORCH_CHECK(cu[0] == 0 && cu[batch] == tokens, op, ": cu_query_lens must span the queries");
  Rows rows{std::vector<int64_t>(tokens), std::vector<int64_t>(tokens)};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t chunk = cu[b + 1] - cu[b];
    TORCH_CHECK(chunk >= 0 && chunk <= lens[b], op, ": chunk longer than its sequence");
    TORCH_CHECK(lens[b] <= capacity, op, ": sequence length ", lens[b], " exceeds its block table");
    TORCH_CHECK(lens[b] <= max_keys, op, ": sequence length ", lens[b], " exceeds the scores width ", max_keys);
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t) {
      rows.seq[t] = b;
      rows.n_keys[t] = lens[b] - (cu[b + 1] - t) + 1;
    }
  }
  return rows;
}

// One query per sequence, each at the end of its sequence: the case decode_split_avx2 serves.
bool is_decode(const Rows& rows, const at::Tensor& seq_lens) {
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  if (static_cast<int64_t>(rows.seq.size()) != seq_lens.size(0)) return false;
  for (size_t t = 0; t < rows.seq.size(); ++t) {
    if (rows.seq[t] != static_cast<int64_t>(t) || rows.n_keys[t] != lens[t]) return false;
  }
  return true;
}

// The first seq_lens[b] slots of a pool widened (widen_sequence) for each sequence b whose chunk
// has several queries to share them; empty for the others (a decoding sequence's one query reads
// its blocks once anyway), and for all when `wanted` is false (the AVX2 kernels do not serve this
// type and width).
template <typename T>
std::vector<std::vector<float>> widen_sequences(const T* pool, const PagedPool& c, const at::Tensor& cu_query_lens,
                                                const at::Tensor& seq_lens, int64_t width, bool wanted) {
  std::vector<std::vector<float>> widened(seq_lens.size(0));
  if constexpr (kWidenable<T>) {
    const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    for (int64_t b = 0; wanted && b < seq_lens.size(0); ++b) {
      if (cu[b + 1] - cu[b] > 1) widened[b] = widen_sequence(pool, c.seq(b), lens[b], width);
    }
  }
  return widened;
}

// Sequence b's widened rows (widen_sequences), or null where it has none.
const float* widened_rows(const std::vector<std::vector<float>>& widened, int64_t b) {
  return widened[b].empty() ? nullptr : widened[b].data();
}

// Query rows [t0, t1) of sequence b: several (up to kTileRows) where a pass works from the
// sequence's widened rows, one where it goes through the paged pool.
struct RowTile {
  int64_t b, t0, t1;
};

// The tiles of a packed-chunk call's rows; tiled(b): whether sequence b's rows come several at a time.
template <typename Tiled>
std::vector<RowTile> row_tiles(const at::Tensor& cu_query_lens, Tiled&& tiled) {
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  std::vector<RowTile> tiles;
  for (int64_t b = 0; b + 1 < cu_query_lens.size(0); ++b) {
    const int64_t step = tiled(b) ? kTileRows : 1;
    for (int64_t t0 = cu[b]; t0 < cu[b + 1]; t0 += step)
      tiles.push_back({b, t0, std::min<int64_t>(t0 + step, cu[b + 1])});
  }
  return tiles;
}

// A work item: a tile's rows for the heads [hd0, hd0 + g), which share one KV head.
struct WorkItem {
  RowTile rows;
  int64_t hd0, g;
};

// Every tile for each KV head's whole group of heads (each key and value row read once for all)
// when that makes enough items to keep every thread busy, else for each head alone.
std::vector<WorkItem> work_items(const std::vector<RowTile>& tiles, int64_t heads, int64_t kv_heads) {
  const int64_t g = heads_per_item(static_cast<int64_t>(tiles.size()), kv_heads, heads / kv_heads);
  std::vector<WorkItem> items;
  for (const RowTile& tile : tiles)
    for (int64_t hd = 0; hd < heads; hd += g) items.push_back({tile, hd, g});
  return items;
}

// The k-th of `count` work items to run, taken from both ends of the list in turn (first, last,
// second, ...). A causal chunk's later rows see more keys, and at::parallel_for hands each thread
// a contiguous range: in list order the thread with the first rows would wait for the other.
inline int64_t from_both_ends(int64_t k, int64_t count) {
  return k % 2 == 0 ? k / 2 : count - 1 - k / 2;
}

struct Scratch {
  std::vector<float> p, inv, acc, qf;
};

// Softmax of each logits row (row r, head i at s[r * s_row + i * s_stride]; left as they are)
// and P V over the KV head's widened values v, for a tile of rows r < rows seeing n_keys[r] keys:
// out row r, head i at out[r * out_row + i * d].
template <typename T>
void tile_attend(T* out, int64_t out_row, const float* s, int64_t s_row, int64_t s_stride, int64_t g,
                 const float* v, int64_t v_stride, int64_t d, const int64_t* n_keys, int64_t rows, Scratch& scratch) {
  const int64_t most = *std::max_element(n_keys, n_keys + rows);
  scratch.p.resize(rows * g * most);
  scratch.inv.resize(rows * g);
  scratch.acc.assign(rows * g * d, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < g; ++i) {
      const float* row = s + r * s_row + i * s_stride;
      float* p = scratch.p.data() + (r * g + i) * most;
      std::copy(row, row + n_keys[r], p);
      scratch.inv[r * g + i] = softmax_inplace(p, n_keys[r]);
    }
  }
  tile_accumulate_values(scratch.acc.data(), scratch.p.data(), g * most, most, g, v, v_stride, d, n_keys, rows);
  for (int64_t r = 0; r < rows; ++r)
    write_normalised(out + r * out_row, scratch.acc.data() + r * g * d, scratch.inv.data() + r * g, g, d);
}

// tile_attend for one row (s: its first head's logits) over the paged pool: g heads of seq's KV head kv.
template <typename T>
void row_attend(T* out, const float* s, int64_t s_stride, int64_t g, const T* values, const PagedSeq& seq, int64_t kv,
                int64_t d, int64_t n, Scratch& scratch) {
  scratch.p.resize(g * n);
  scratch.inv.resize(g);
  scratch.acc.resize(g * d);
  for (int64_t i = 0; i < g; ++i) {
    std::copy(s + i * s_stride, s + i * s_stride + n, scratch.p.begin() + i * n);
    scratch.inv[i] = softmax_inplace(scratch.p.data() + i * n, n);
  }
  weighted_values(out, scratch.p.data(), n, scratch.inv.data(), g, values, seq, kv, d, n, scratch.acc.data());
}

// scores[t, h, j] = scale * q[t, h] . K[j] for the rows t of sequence b's chunk and the keys j
// before its first query, which every row sees: one matrix product per head through ATen's GEMM
// (MKL here), at two to three times the rate of the tiles' dot products. widened_keys: the
// sequence's keys as widen_sequence made them. Returns how many keys that is.
int64_t shared_key_logits(at::Tensor& scores, const at::Tensor& query, const std::vector<float>& widened_keys,
                          const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, int64_t b, int64_t kv_heads,
                          double scale) {
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  const int64_t rows = cu[b + 1] - cu[b], shared = seq_lens.data_ptr<int32_t>()[b] - rows;
  if (rows < 2 || shared <= 0) return 0;
  const int64_t heads = query.size(1), d = query.size(2), group = heads / kv_heads;
  const at::Tensor q = query.narrow(0, cu[b], rows).to(at::kFloat) * scale;  // a copy: never the caller's query
  const at::Tensor k = at::from_blob(const_cast<float*>(widened_keys.data()), {shared, kv_heads, d},
                                     {kv_heads * d, d, 1}, scores.options());
  for (int64_t h = 0; h < heads; ++h) {
    at::Tensor s = scores.narrow(0, cu[b], rows).select(1, h).narrow(1, 0, shared);
    at::mm_out(s, q.select(1, h), k.select(1, h / group).t());
  }
  return shared;
}

// s[hd * s_stride + j - j0] += scale * q'_hd . k'_j for keys [j0, j1) of one query row (q: heads
// rows of rank r), eight keys at a time per KV head: from the sequence's widened k' rows when
// given, else from its paged pool, each run of a block's k' rows widened once (the next one
// fetched meanwhile). scratch: heads * r + block_size * kv_heads * r floats. r a multiple of 8.
template <typename T>
void add_delta_avx2(float* s, int64_t s_stride, const T* q, int64_t heads, int64_t group, const T* keys,
                    const PagedSeq& seq, int64_t j0, int64_t j1, int64_t r, float scale, float* scratch,
                    const float* widened) {
  float* qf = scratch;
  float* staged = scratch + heads * r;
  const int64_t slot = seq.kv_heads * r;  // a slot holds every KV head's k'
  widen_avx2(qf, q, heads * r);
  for (int64_t j = j0; j < j1;) {
    const int64_t run = widened != nullptr ? j1 - j : std::min(seq.block_size - j % seq.block_size, j1 - j);
    const float* rows = widened != nullptr ? widened + j * slot : staged;
    if (widened == nullptr) {
      const T* next = j + run < j1 ? keys + seq.row(j + run) * r : nullptr;  // fetched meanwhile
      widen_avx2_ahead(staged, keys + seq.row(j) * r, run * slot, next);
    }
    for (int64_t kv = 0; kv < seq.kv_heads; ++kv)
      group_key_logits_avx2(s + kv * group * s_stride + (j - j0), s_stride, qf + kv * group * r, group, rows + kv * r,
                            run, slot, r, scale, /*accumulate=*/true);
    j += run;
  }
}

void paged_attention_scores_cpu(at::Tensor& out, at::Tensor& scores, const at::Tensor& query,
                                const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& cu_query_lens,
                                const at::Tensor& seq_lens, double scale) {
  check_attention_scores_args(out, scores, query, key_cache, value_cache, block_tables, cu_query_lens, seq_lens);
  const int64_t tokens = query.size(0), heads = query.size(1), d = query.size(2);
  const int64_t block_size = key_cache.size(1), num_blocks = key_cache.size(0), kv_heads = key_cache.size(2);
  const int64_t group = heads / kv_heads, max_keys = scores.size(2), max_blocks = block_tables.size(1);
  const Rows rows = chunk_rows(cu_query_lens, seq_lens, block_tables, block_size, tokens, max_keys,
                               "paged_attention_scores");
  const PagedPool pool{block_tables.data_ptr<int32_t>(), max_blocks, block_size, num_blocks, kv_heads};
  float* s_all = scores.data_ptr<float>();
  LISA_DISPATCH_FLOATS(query.scalar_type(), "paged_attention_scores", [&] {
    const scalar_t* q_all = query.data_ptr<scalar_t>();
    const scalar_t* keys = key_cache.data_ptr<scalar_t>();
    const scalar_t* values = value_cache.data_ptr<scalar_t>();
    scalar_t* o_all = out.data_ptr<scalar_t>();
    if constexpr (kWidenable<scalar_t>) {
      if (use_avx2<scalar_t>(d) && is_decode(rows, seq_lens)) {
        decode_split_avx2(o_all, q_all, query.stride(0), keys, values, pool, seq_lens.data_ptr<int32_t>(), tokens,
                          heads, d, static_cast<float>(scale), DecodeLogits{nullptr, s_all, max_keys});
        return;
      }
    }
    const auto widened_keys = widen_sequences(keys, pool, cu_query_lens, seq_lens, d, use_avx2<scalar_t>(d));
    const auto widened_values = widen_sequences(values, pool, cu_query_lens, seq_lens, d, use_avx2<scalar_t>(d));
    // Tiles where both were widened (the same condition made both, or neither).
    const auto items = work_items(row_tiles(cu_query_lens, [&](int64_t b) {
      return !widened_keys[b].empty() && !widened_values[b].empty();
    }), heads, kv_heads);
    const int64_t count = static_cast<int64_t>(items.size());
    // Keys before a chunk's first query are seen by every row of it: their logits as matrix
    // products; the rows' own band of keys (causal) then comes with the tiles.
    std::vector<int64_t> band_start(seq_lens.size(0), 0);
    for (int64_t b = 0; b < seq_lens.size(0); ++b) {
      if (!widened_keys[b].empty())
        band_start[b] = shared_key_logits(scores, query, widened_keys[b], cu_query_lens, seq_lens, b, kv_heads, scale);
    }
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t k = begin; k < end; ++k) {
        const WorkItem& item = items[from_both_ends(k, count)];
        const RowTile& it = item.rows;
        const int64_t kv = item.hd0 / group, rows_in = it.t1 - it.t0, hd0 = item.hd0, g = item.g;
        float* s = s_all + (it.t0 * heads + hd0) * max_keys;
        const float* wk = widened_rows(widened_keys, it.b);
        const float* wv = widened_rows(widened_values, it.b);
        if constexpr (kWidenable<scalar_t>) {
          if (wk != nullptr && wv != nullptr) {  // a tile of rows: logits, softmax and P V, a key block at a time
            scratch.qf.resize(rows_in * g * d);
            for (int64_t r = 0; r < rows_in; ++r)
              widen_avx2(scratch.qf.data() + r * g * d, q_all + (it.t0 + r) * query.stride(0) + hd0 * d, g * d);
            const int64_t* n_keys = rows.n_keys.data() + it.t0;
            tile_key_logits(s, heads * max_keys, max_keys, scratch.qf.data(), g, wk + kv * d, kv_heads * d, d,
                            band_start[it.b], n_keys, rows_in, static_cast<float>(scale));
            tile_attend(o_all + (it.t0 * heads + hd0) * d, heads * d, s, heads * max_keys, max_keys, g,
                        wv + kv * d, kv_heads * d, d, n_keys, rows_in, scratch);
            continue;
          }
        }
        const PagedSeq seq = pool.seq(it.b);
        const int64_t n = rows.n_keys[it.t0];
        key_logits(s, max_keys, q_all + it.t0 * query.stride(0) + hd0 * d, g, keys, seq, kv, d, n,
                   static_cast<float>(scale));
        // The logits stay in `scores` for the next layer; the softmax works on a copy.
        row_attend(o_all + (it.t0 * heads + hd0) * d, s, max_keys, g, values, seq, kv, d, n, scratch);
      }
    });
  });
}

void lisa_attention_cpu(at::Tensor& out, const std::optional<at::Tensor>& scores_out,
                        const at::Tensor& scores_prev, const at::Tensor& query_lr, const at::Tensor& key_lr_cache,
                        const at::Tensor& value_cache, const at::Tensor& block_tables,
                        const at::Tensor& cu_query_lens, const at::Tensor& seq_lens, const at::Tensor& align_a,
                        const at::Tensor& align_w1, const at::Tensor& align_b1, const at::Tensor& align_w2,
                        const at::Tensor& align_b2, double delta_scale) {
  check_lisa_args(out, scores_out, scores_prev, query_lr, key_lr_cache, value_cache, block_tables, cu_query_lens,
                  seq_lens, align_a, align_w1, align_b1, align_w2, align_b2);
  const int64_t tokens = query_lr.size(0), heads = query_lr.size(1), rank = query_lr.size(2);
  const int64_t block_size = value_cache.size(1), num_blocks = value_cache.size(0);
  const int64_t kv_heads = value_cache.size(2), d = value_cache.size(3), group = heads / kv_heads;
  const int64_t width = align_w1.size(0), prev_keys = scores_prev.size(2), max_blocks = block_tables.size(1);
  const int64_t out_keys = scores_out.has_value() ? scores_out->size(2) : prev_keys;
  const Rows rows = chunk_rows(cu_query_lens, seq_lens, block_tables, block_size, tokens,
                               std::min(prev_keys, out_keys), "lisa_attention");
  const PagedPool pool{block_tables.data_ptr<int32_t>(), max_blocks, block_size, num_blocks, kv_heads};
  const float* prev = scores_prev.data_ptr<float>();
  const float* A = align_a.data_ptr<float>();
  const float* W1 = align_w1.data_ptr<float>();
  const float* b1 = align_b1.data_ptr<float>();
  const float* W2 = align_w2.data_ptr<float>();
  const float* b2 = align_b2.data_ptr<float>();
  const float delta = static_cast<float>(delta_scale);
  const bool vectorised = has_avx2(), decode = is_decode(rows, seq_lens);
  const int64_t scratch_floats = std::max((heads + width) * 8, heads * rank + block_size * kv_heads * rank);
  LISA_DISPATCH_FLOATS(query_lr.scalar_type(), "lisa_attention", [&] {
    const scalar_t* q_all = query_lr.data_ptr<scalar_t>();
    const scalar_t* keys = key_lr_cache.data_ptr<scalar_t>();
    const scalar_t* values = value_cache.data_ptr<scalar_t>();
    scalar_t* o_all = out.data_ptr<scalar_t>();
    const bool delta_avx2 = use_avx2<scalar_t>(rank);
    // S[t, :, j] for keys [j0, j1) of query row t into s[h * s_stride + j - j0]: the aligned
    // logits, eight keys at a time where AVX2 serves (j0 a multiple of 8, so that the groups of
    // eight are the same in decode and prefill), then the low-rank delta q'_hd . k'_j.
    auto row_logits = [&](int64_t t, int64_t j0, int64_t j1, float* s, int64_t s_stride, float* scratch,
                          const float* widened_keys) {
      const PagedSeq seq = pool.seq(rows.seq[t]);
      const scalar_t* q_row = q_all + t * query_lr.stride(0);
      const float* prev_row = prev + t * heads * prev_keys + j0;
      const int64_t n = j1 - j0;
      int64_t j = 0;
      if (vectorised) {
        for (; j + 8 <= n; j += 8)
          align_keys8(s, s_stride, prev_row, prev_keys, j, heads, width, A, W1, b1, W2, b2, scratch);
      }
      for (; j < n; ++j) align_key(s, s_stride, prev_row, prev_keys, j, heads, width, A, W1, b1, W2, b2, scratch);
      if constexpr (kWidenable<scalar_t>) {
        if (delta_avx2) {
          return add_delta_avx2(s, s_stride, q_row, heads, group, keys, seq, j0, j1, rank, delta, scratch,
                                widened_keys);
        }
      }
      for (j = j0; j < j1; ++j) {
        const scalar_t* k = keys + seq.row(j) * rank;
        for (int64_t hd = 0; hd < heads; ++hd)
          s[hd * s_stride + j - j0] += delta * dot(q_row + hd * rank, k + hd / group * rank, rank);
      }
    };
    // Decode: one work item per run of a sequence's keys computes the run's logits, then its
    // softmax and P V, reading the previous layer's logits, the low-rank keys and the values of
    // the run together (and the logits go to scores_out only when a LiSA layer follows).
    if constexpr (kWidenable<scalar_t>) {
      if (use_avx2<scalar_t>(d) && decode) {
        const FillLogits fill = [&](int64_t b, int64_t j0, int64_t n, float* s, int64_t s_stride) {
          std::vector<float> scratch(scratch_floats);
          row_logits(b, j0, j0 + n, s, s_stride, scratch.data(), nullptr);
        };
        float* handed_on = scores_out.has_value() ? scores_out->data_ptr<float>() : nullptr;
        decode_split_avx2<scalar_t>(o_all, nullptr, 0, nullptr, values, pool, seq_lens.data_ptr<int32_t>(), tokens,
                                    heads, d, 0.0f, DecodeLogits{&fill, handed_on, out_keys});
        return;
      }
    }
    // Otherwise tiles of query rows (several where the chunk's values are widened, once per
    // sequence, as every row reads them; its k' too where the delta's kernel takes them).
    const auto widened_keys = widen_sequences(keys, pool, cu_query_lens, seq_lens, rank, delta_avx2);
    const auto widened_values = widen_sequences(values, pool, cu_query_lens, seq_lens, d, use_avx2<scalar_t>(d));
    const auto tiles = row_tiles(cu_query_lens, [&](int64_t b) { return !widened_values[b].empty(); });
    const int64_t count = static_cast<int64_t>(tiles.size());
    // Softmax and P V of a tile's rows for KV head kv's group of heads [hd, hd + g) (all of its
    // heads or one), from their logits s (a row's heads s_stride apart, rows heads * s_stride).
    auto attend = [&](const RowTile& tile, int64_t hd, int64_t g, const float* s, int64_t s_stride, Scratch& scratch) {
      const int64_t kv = hd / group, rows_in = tile.t1 - tile.t0;
      scalar_t* o = o_all + (tile.t0 * heads + hd) * d;
      const int64_t* n_keys = rows.n_keys.data() + tile.t0;
      if (const float* wv = widened_rows(widened_values, tile.b)) {
        tile_attend(o, heads * d, s, heads * s_stride, s_stride, g, wv + kv * d, kv_heads * d, d, n_keys, rows_in,
                    scratch);
      } else {
        row_attend(o, s, s_stride, g, values, pool.seq(tile.b), kv, d, n_keys[0], scratch);
      }
    };
    if (count >= 2 * at::get_num_threads()) {
      // A work item per tile: its logits for every head (the aligner mixes them), into scores_out
      // when given, else into the thread's own buffer, then each KV head's softmax and P V while
      // those logits are still in cache.
      at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(scratch_floats), own;
        Scratch attend_scratch;
        for (int64_t k = begin; k < end; ++k) {
          const RowTile& tile = tiles[from_both_ends(k, count)];
          const int64_t rows_in = tile.t1 - tile.t0;
          const int64_t* n_keys = rows.n_keys.data() + tile.t0;
          float* s = nullptr;
          int64_t s_stride = out_keys;  // from one head's logits to the next
          if (scores_out.has_value()) {
            s = scores_out->data_ptr<float>() + tile.t0 * heads * out_keys;
          } else {
            s_stride = *std::max_element(n_keys, n_keys + rows_in);
            own.resize(rows_in * heads * s_stride);
            s = own.data();
          }
          for (int64_t r = 0; r < rows_in; ++r)
            row_logits(tile.t0 + r, 0, n_keys[r], s + r * heads * s_stride, s_stride, scratch.data(),
                       widened_rows(widened_keys, tile.b));
          for (int64_t kv = 0; kv < kv_heads; ++kv)
            attend(tile, kv * group, group, s + kv * group * s_stride, s_stride, attend_scratch);
        }
      });
      return;
    }
    // Too few tiles to busy every thread (a few rows over a long context): two passes, each spread
    // wider. The logits over (row, block of keys), into scores_out or a tensor of that layout...
    at::Tensor logits =
        scores_out.has_value() ? *scores_out : at::empty({tokens, heads, prev_keys}, scores_prev.options());
    float* s_all = logits.data_ptr<float>();
    int64_t most_keys = 0;
    for (const int64_t n : rows.n_keys) most_keys = std::max(most_keys, n);
    const int64_t key_blocks = (most_keys + kTileKeys - 1) / kTileKeys;
    at::parallel_for(0, tokens * key_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(scratch_floats);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t idx = from_both_ends(k, tokens * key_blocks);
        const int64_t t = idx / key_blocks, j0 = (idx % key_blocks) * kTileKeys;
        const int64_t j1 = std::min(j0 + kTileKeys, rows.n_keys[t]);
        if (j0 < j1)
          row_logits(t, j0, j1, s_all + t * heads * out_keys + j0, out_keys, scratch.data(),
                     widened_rows(widened_keys, rows.seq[t]));
      }
    });
    // ... then softmax and P V over the tiles' heads, a KV head's group or one head at a time.
    const auto items = work_items(tiles, heads, kv_heads);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      Scratch attend_scratch;
      for (int64_t k = begin; k < end; ++k) {
        const WorkItem& item = items[k];
        attend(item.rows, item.hd0, item.g, s_all + (item.rows.t0 * heads + item.hd0) * out_keys, out_keys,
               attend_scratch);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lisa_rt, CPU, m) {
  m.impl("paged_attention_scores", &paged_attention_scores_cpu);
  m.impl("lisa_attention", &lisa_attention_cpu);
}

}  // namespace lisa_rt
