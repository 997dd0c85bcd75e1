"""The LiSA attention ops (paged_attention_scores, lisa_attention) against reference.py.

Awkward sizes throughout: odd and GQA head counts, sequences across block (16) and key-tile
(32 on CUDA, 64 on the CPU) boundaries, chunks of length 0 and 1, row-strided queries,
poisoned outputs and poisoned invisible columns of the previous layer's scores.
"""
import math

import pytest
import torch

from lisa_rt import ops, reference
from tests.op_testing import poison, random_block_tables  # the device and dtype fixtures live in conftest.py

pytestmark = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")

# Outputs: float32 sums in another order (softmax amplifies logit rounding a little), or one
# rounding of a bf16/fp16 output. Logits are float32 whatever the model dtype.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
SCORE_TOL = (1e-4, 1e-4)
BLOCK = 16


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


def close_scores(actual, expected, mask):
    """Visible columns equal the reference; the others still hold the poison (NaN)."""
    actual = actual.cpu()
    m = mask[:, None, :].expand_as(actual)
    atol, rtol = SCORE_TOL
    torch.testing.assert_close(actual[m], expected.cpu()[m], atol=atol, rtol=rtol)
    assert torch.isnan(actual[~m]).all(), "columns past a row's position were written"


class Batch:
    """Packed chunks: (chunk_len, seq_len) per sequence, the chunk being the sequence's last tokens."""

    def __init__(self, chunks, device, extra_keys=3):
        self.lengths = [n for _, n in chunks]
        self.num_blocks = sum(math.ceil(n / BLOCK) for n in self.lengths) + 2
        self.tables = random_block_tables(self.lengths, BLOCK, self.num_blocks, device)
        self.cu = torch.tensor([0] + torch.tensor([c for c, _ in chunks]).cumsum(0).tolist(), dtype=torch.int32,
                               device=device)
        self.seq_lens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        self.tokens = int(self.cu[-1])
        self.max_keys = max(self.lengths) + extra_keys
        self.visible = reference.visible_keys(self.cu.cpu(), self.seq_lens.cpu(), self.max_keys)

    def cache(self, kv_heads, dim, device, dtype):
        return torch.randn(self.num_blocks, BLOCK, kv_heads, dim, device=device, dtype=dtype)

    def strided_rows(self, heads, dim, device, dtype, scale=1.0):
        """[tokens, heads, dim] as a row-strided slice of a wider projection, as the decoder passes it."""
        fused = torch.randn(self.tokens, (heads + 3) * dim, device=device, dtype=dtype) * scale
        return fused[:, dim : (heads + 1) * dim].view(self.tokens, heads, dim)

    def prev_scores(self, heads, device, magnitude=3.0):
        """Previous-layer logits, NaN in the columns no row may read."""
        s = torch.randn(self.tokens, heads, self.max_keys) * magnitude
        s = s.masked_fill(~self.visible[:, None, :], float("nan"))
        return s.to(device)


def aligner(heads, width, device, scale=1.0):
    g = torch.Generator().manual_seed(heads * 1000 + width)
    w = [torch.randn(heads, heads, generator=g) / math.sqrt(heads) * scale,
         torch.randn(width, heads, generator=g) / math.sqrt(heads),
         torch.randn(width, generator=g),
         torch.randn(heads, width, generator=g) / math.sqrt(max(width, 1)) * scale,
         torch.randn(heads, generator=g)]
    return [t.to(device) for t in w]


CHUNKS = [
    [(7, 7)],
    [(5, 21), (16, 16), (1, 40)],
    [(0, 3), (33, 100), (1, 1), (130, 130)],
    [(1, 64), (1, 65), (2, 33), (0, 17), (3, 32)],
    # Decode-shaped (a token per sequence: the CUDA split-context path), one context long
    # enough to be split many ways.
    [(1, 1), (1, 300), (1, 64), (1, 33)],
    # As many tokens as sequences, but not one each: the decode path must still map tokens.
    [(2, 40), (0, 10), (1, 700)],
]


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 128), (16, 1, 72)])
@pytest.mark.parametrize("chunks", CHUNKS)
def test_paged_attention_scores(device, dtype, heads, kv_heads, dim, chunks):
    batch = Batch(chunks, device)
    key_cache, value_cache = batch.cache(kv_heads, dim, device, dtype), batch.cache(kv_heads, dim, device, dtype)
    query = batch.strided_rows(heads, dim, device, dtype)
    out = poison(torch.empty(batch.tokens, heads, dim, device=device, dtype=dtype))
    scores = poison(torch.empty(batch.tokens, heads, batch.max_keys, device=device))
    scale = 1 / math.sqrt(dim)
    inputs = (query, key_cache, value_cache)
    before = [t.clone() for t in inputs]
    ops.paged_attention_scores(out, scores, query, key_cache, value_cache, batch.tables, batch.cu, batch.seq_lens,
                               scale)
    assert all(torch.equal(t, b) for t, b in zip(inputs, before))  # e.g. a float32 query scaled in place
    want_out, want_scores = reference.attention_scores(query.cpu(), key_cache.cpu(), value_cache.cpu(),
                                                       batch.tables.cpu(), batch.cu.cpu(), batch.seq_lens.cpu(),
                                                       scale, batch.max_keys)
    close(out, want_out, dtype)
    close_scores(scores, want_scores, batch.visible)
    # The output is exactly what paged_prefill_attention computes.
    plain = poison(torch.empty_like(out))
    ops.paged_prefill_attention(plain, query, key_cache, value_cache, batch.tables, batch.cu, batch.seq_lens, scale)
    close(out, plain, dtype)


def run_lisa(batch, heads, kv_heads, dim, rank, width, device, dtype, with_scores_out=True, weights=None,
             delta_scale=None, scores_prev=None):
    key_lr = batch.cache(kv_heads, rank, device, dtype)
    value_cache = batch.cache(kv_heads, dim, device, dtype)
    query_lr = batch.strided_rows(heads, rank, device, dtype)
    weights = weights if weights is not None else aligner(heads, width, device)
    scores_prev = scores_prev if scores_prev is not None else batch.prev_scores(heads, device)
    delta_scale = 1 / math.sqrt(rank) if delta_scale is None else delta_scale
    out = poison(torch.empty(batch.tokens, heads, dim, device=device, dtype=dtype))
    scores_out = poison(torch.empty(batch.tokens, heads, batch.max_keys, device=device)) if with_scores_out else None
    ops.lisa_attention(out, scores_out, scores_prev, query_lr, key_lr, value_cache, batch.tables, batch.cu,
                       batch.seq_lens, *weights, delta_scale)
    want_out, want_scores = reference.lisa_attention(scores_prev.cpu(), query_lr.cpu(), key_lr.cpu(),
                                                     value_cache.cpu(), batch.tables.cpu(), batch.cu.cpu(),
                                                     batch.seq_lens.cpu(), *[w.cpu() for w in weights], delta_scale)
    return out, scores_out, want_out, want_scores


@pytest.mark.parametrize("heads,kv_heads,dim,rank,width", [
    (9, 3, 64, 8, 9),      # odd heads (odd shared strides), GQA 3
    (8, 2, 128, 6, 32),    # rank not a multiple of 4
    (16, 1, 72, 2, 1),     # MQA: 16 head rows over 8 warps; awkward head dim; width 1
    (6, 6, 64, 16, 0),     # MHA, no hidden layer (width 0)
])
@pytest.mark.parametrize("chunks", CHUNKS)
def test_lisa_attention(device, dtype, heads, kv_heads, dim, rank, width, chunks):
    batch = Batch(chunks, device)
    out, scores_out, want_out, want_scores = run_lisa(batch, heads, kv_heads, dim, rank, width, device, dtype)
    close(out, want_out, dtype)
    close_scores(scores_out, want_scores, batch.visible)


@pytest.mark.parametrize("heads,kv_heads,dim,rank,width", [
    # CUDA: aligner weights fit in shared memory next to the tiles (about 195 KiB on an H100).
    (64, 8, 256, 256, 256),
    # CUDA: the tiles alone take about 177 KiB; the weights do not fit and are read from global.
    (64, 2, 256, 256, 256),
    # CUDA decode: the aligned-logits kernel's 32-head variant with its largest rank.
    (32, 8, 128, 256, 32),
])
@pytest.mark.parametrize("chunks", [[(3, 40), (1, 33), (2, 2)], [(1, 40), (1, 333), (1, 2)]])
def test_lisa_attention_large(device, heads, kv_heads, dim, rank, width, chunks):
    batch = Batch(chunks, device)
    out, scores_out, want_out, want_scores = run_lisa(batch, heads, kv_heads, dim, rank, width, device,
                                                      torch.float32)
    close(out, want_out, torch.float32)
    close_scores(scores_out, want_scores, batch.visible)


@pytest.mark.parametrize("chunks", [2, 4, 5])  # prefill-shaped, and the CUDA decode path's two layouts
def test_lisa_attention_without_scores_out(device, dtype, chunks):
    batch = Batch(CHUNKS[chunks], device)
    out, _, want_out, _ = run_lisa(batch, 12, 4, 64, 8, 12, device, dtype, with_scores_out=False)
    close(out, want_out, dtype)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 6), (4, 1)])
@pytest.mark.parametrize("zero", ["delta_scale", "low_rank"])
def test_direct_sharing_is_plain_attention(device, dtype, heads, kv_heads, zero):
    """A = a head permutation, W2 = 0, b2 = 0, no delta: LiSA attends with the previous layer's
    logits, rows permuted, over its own values (exactly DESIGN's step-0 initialisation)."""
    dim, rank, width = 64, 8, 16
    batch = Batch(CHUNKS[1], device)
    group = heads // kv_heads
    # Layer l-1: a full layer that emits its logits.
    k1, v1 = batch.cache(kv_heads, dim, device, dtype), batch.cache(kv_heads, dim, device, dtype)
    q1 = batch.strided_rows(heads, dim, device, dtype)
    scale = 1 / math.sqrt(dim)
    scores1 = poison(torch.empty(batch.tokens, heads, batch.max_keys, device=device))
    ops.paged_attention_scores(torch.empty_like(q1), scores1, q1, k1, v1, batch.tables, batch.cu, batch.seq_lens,
                               scale)
    # Layer l: LiSA with head matching perm.
    perm = torch.randperm(heads)
    A = torch.eye(heads)[perm].to(device)
    _, W1, b1, _, _ = aligner(heads, width, device)
    W2, b2 = torch.zeros(heads, width, device=device), torch.zeros(heads, device=device)
    key_lr, v2 = batch.cache(kv_heads, rank, device, dtype), batch.cache(kv_heads, dim, device, dtype)
    query_lr = batch.strided_rows(heads, rank, device, dtype)
    delta = 0.0 if zero == "delta_scale" else 1.0
    if zero == "low_rank":
        query_lr.zero_()
    out = poison(torch.empty(batch.tokens, heads, dim, device=device, dtype=dtype))
    scores2 = poison(torch.empty_like(scores1))
    ops.lisa_attention(out, scores2, scores1, query_lr, key_lr, v2, batch.tables, batch.cu, batch.seq_lens,
                       A, W1, b1, W2, b2, delta)
    # Plain attention: head hd uses query head perm[hd] and key head perm[hd] // group of layer
    # l-1, and value head hd // group of layer l (caches expanded to one kv head per query head).
    plain = poison(torch.empty_like(out))
    k_perm = k1.repeat_interleave(group, dim=2)[:, :, perm].contiguous()
    v_exp = v2.repeat_interleave(group, dim=2).contiguous()
    ops.paged_prefill_attention(plain, q1[:, perm].contiguous(), k_perm, v_exp, batch.tables, batch.cu,
                                batch.seq_lens, scale)
    close(out, plain, dtype)
    # The logits are the previous ones, rows permuted, bit for bit.
    m = batch.visible[:, None, :].expand(batch.tokens, heads, batch.max_keys)
    assert torch.equal(scores2.cpu()[m], scores1.cpu()[:, perm][m])


def test_chain(device, dtype):
    """full (emits S1) -> LiSA (reads S1, emits S2) -> LiSA (reads S2, emits S3), ping-ponging two
    buffers, equals the reference chain."""
    heads, kv_heads, dim, rank, width = 8, 2, 64, 8, 24
    batch = Batch(CHUNKS[2], device)
    scale = 1 / math.sqrt(dim)
    k1, v1 = batch.cache(kv_heads, dim, device, dtype), batch.cache(kv_heads, dim, device, dtype)
    q1 = batch.strided_rows(heads, dim, device, dtype)
    buf_a = poison(torch.empty(batch.tokens, heads, batch.max_keys, device=device))
    buf_b = poison(torch.empty_like(buf_a))
    ops.paged_attention_scores(torch.empty_like(q1), buf_a, q1, k1, v1, batch.tables, batch.cu, batch.seq_lens,
                               scale)
    _, want = reference.attention_scores(q1.cpu(), k1.cpu(), v1.cpu(), batch.tables.cpu(), batch.cu.cpu(),
                                         batch.seq_lens.cpu(), scale, batch.max_keys)
    bufs = [buf_a, buf_b]
    for layer in range(2):
        prev, nxt = bufs[layer % 2], bufs[(layer + 1) % 2]
        weights = aligner(heads, width + layer, device, scale=0.7)
        key_lr, value_cache = batch.cache(kv_heads, rank, device, dtype), batch.cache(kv_heads, dim, device, dtype)
        query_lr = batch.strided_rows(heads, rank, device, dtype)
        out = poison(torch.empty(batch.tokens, heads, dim, device=device, dtype=dtype))
        poison(nxt)
        ops.lisa_attention(out, nxt, prev, query_lr, key_lr, value_cache, batch.tables, batch.cu, batch.seq_lens,
                           *weights, 1 / math.sqrt(rank))
        want_out, want = reference.lisa_attention(want, query_lr.cpu(), key_lr.cpu(), value_cache.cpu(),
                                                  batch.tables.cpu(), batch.cu.cpu(), batch.seq_lens.cpu(),
                                                  *[w.cpu() for w in weights], 1 / math.sqrt(rank))
        close(out, want_out, dtype)
        close_scores(nxt, want, batch.visible)


def test_decode_equals_last_rows_of_prefill(device):
    """Chunks of one token (decode) reproduce the last rows of full prefills, for both ops."""
    heads, kv_heads, dim, rank, width = 6, 2, 64, 8, 12
    lengths = [45, 1, 32, 33]
    full = Batch([(n, n) for n in lengths], device)
    decode = Batch([(1, n) for n in lengths], device)
    decode.tables, decode.num_blocks = full.tables, full.num_blocks  # the same caches
    last = (full.cu[1:] - 1).long()
    scale = 1 / math.sqrt(dim)
    k1, v1 = full.cache(kv_heads, dim, device, torch.float32), full.cache(kv_heads, dim, device, torch.float32)
    q1 = torch.randn(full.tokens, heads, dim, device=device)
    out1 = torch.empty_like(q1)
    s1 = poison(torch.empty(full.tokens, heads, full.max_keys, device=device))
    ops.paged_attention_scores(out1, s1, q1, k1, v1, full.tables, full.cu, full.seq_lens, scale)
    out1_dec = torch.empty(len(lengths), heads, dim, device=device)
    s1_dec = poison(torch.empty(len(lengths), heads, full.max_keys, device=device))
    ops.paged_attention_scores(out1_dec, s1_dec, q1[last].contiguous(), k1, v1, decode.tables, decode.cu,
                               decode.seq_lens, scale)
    torch.testing.assert_close(out1_dec, out1[last], atol=1e-5, rtol=1e-5)
    m = decode.visible[:, None, :].expand_as(s1_dec).to(device)
    torch.testing.assert_close(s1_dec[m], s1[last][m], atol=1e-5, rtol=1e-5)

    weights = aligner(heads, width, device)
    key_lr, v2 = full.cache(kv_heads, rank, device, torch.float32), full.cache(kv_heads, dim, device, torch.float32)
    q2 = torch.randn(full.tokens, heads, rank, device=device)
    out2 = torch.empty(full.tokens, heads, dim, device=device)
    s2 = poison(torch.empty_like(s1))
    ops.lisa_attention(out2, s2, s1, q2, key_lr, v2, full.tables, full.cu, full.seq_lens, *weights, 0.3)
    out2_dec = torch.empty(len(lengths), heads, dim, device=device)
    s2_dec = poison(torch.empty_like(s1_dec))
    # The decode step's previous scores are the decode rows of the full layer.
    ops.lisa_attention(out2_dec, s2_dec, s1_dec, q2[last].contiguous(), key_lr, v2, decode.tables, decode.cu,
                       decode.seq_lens, *weights, 0.3)
    torch.testing.assert_close(out2_dec, out2[last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2_dec[m], s2[last][m], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_lisa_decode_rows_do_not_depend_on_their_batch():
    """As the decode attention's test in test_ops.py: a LiSA decode batch of 3 and the same rows
    padded to 4 (a row of no keys, as CUDA-graph padding) give the same outputs and handed-on
    logits bit for bit, at LLaMA-2-7B's heads and contexts long enough to be split."""
    heads, dim, rank, width, block_size, lengths = 32, 128, 16, 32, 16, [700, 1500, 333]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 4
    max_keys = max(lengths) + 8
    key_lr = torch.randn(num_blocks, block_size, heads, rank, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(num_blocks, block_size, heads, dim, device="cuda", dtype=torch.bfloat16)
    tables = random_block_tables(lengths + [0], block_size, num_blocks, "cuda")
    scores_prev = torch.randn(4, heads, max_keys, device="cuda") * 3
    query_lr = torch.randn(4, heads, rank, device="cuda", dtype=torch.bfloat16)
    weights = aligner(heads, width, "cuda")
    results = []
    for rows in (3, 4):
        out = torch.zeros(rows, heads, dim, device="cuda", dtype=torch.bfloat16)
        scores_out = torch.zeros(rows, heads, max_keys, device="cuda")
        ops.lisa_attention(out, scores_out, scores_prev[:rows].contiguous(), query_lr[:rows].contiguous(), key_lr,
                           values, tables[:rows].contiguous(), torch.arange(rows + 1, dtype=torch.int32, device="cuda"),
                           torch.tensor((lengths + [0])[:rows], dtype=torch.int32, device="cuda"), *weights, 0.25)
        results.append((out[:3], scores_out[:3]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def lisa_case(device, tokens_per_seq=(3, 2), lengths=(20, 9), heads=4, kv_heads=2, dim=64, rank=8, width=5):
    batch = Batch(list(zip(tokens_per_seq, lengths)), device)
    return dict(
        out=torch.empty(batch.tokens, heads, dim, device=device),
        scores_out=torch.zeros(batch.tokens, heads, batch.max_keys, device=device),
        scores_prev=torch.randn(batch.tokens, heads, batch.max_keys, device=device),
        query_lr=torch.randn(batch.tokens, heads, rank, device=device),
        key_lr_cache=batch.cache(kv_heads, rank, device, torch.float32),
        value_cache=batch.cache(kv_heads, dim, device, torch.float32),
        block_tables=batch.tables, cu_query_lens=batch.cu, seq_lens=batch.seq_lens,
        align_a=torch.randn(heads, heads, device=device), align_w1=torch.randn(width, heads, device=device),
        align_b1=torch.randn(width, device=device), align_w2=torch.randn(heads, width, device=device),
        align_b2=torch.randn(heads, device=device), delta_scale=0.25)


def call_lisa(**kw):
    ops.lisa_attention(**kw)


def test_bad_arguments_raise(device):
    base = lisa_case(device)
    with pytest.raises(RuntimeError, match="rank must be even"):
        kw = dict(base, query_lr=torch.randn(5, 4, 7, device=device))
        kw["key_lr_cache"] = torch.randn(*base["key_lr_cache"].shape[:3], 7, device=device)
        call_lisa(**kw)
    with pytest.raises(RuntimeError, match="overlap"):
        call_lisa(**dict(base, scores_out=base["scores_prev"]))
    with pytest.raises(RuntimeError, match="align_w2"):
        call_lisa(**dict(base, align_w2=torch.randn(4, 6, device=device)))
    with pytest.raises(RuntimeError, match="align_a"):
        call_lisa(**dict(base, align_a=base["align_a"].to(torch.float16)))
    with pytest.raises(RuntimeError, match="dtype"):
        call_lisa(**dict(base, out=base["out"].half()))
    with pytest.raises(RuntimeError, match="scores_prev"):
        call_lisa(**dict(base, scores_prev=base["scores_prev"].double()))
    q = torch.randn(5, 4, 64, device=device)
    with pytest.raises(RuntimeError, match="scores"):
        ops.paged_attention_scores(torch.empty_like(q), torch.empty(5, 3, 30, device=device), q,
                                   base["value_cache"], base["value_cache"], base["block_tables"],
                                   base["cu_query_lens"], base["seq_lens"], 0.125)
    if device == "cpu":  # range checks read the lengths: host-side only
        with pytest.raises(RuntimeError, match="scores width"):
            ops.paged_attention_scores(torch.empty_like(q), torch.empty(5, 4, 19, device=device), q,
                                       base["value_cache"], base["value_cache"], base["block_tables"],
                                       base["cu_query_lens"], base["seq_lens"], 0.125)


@pytest.mark.parametrize("name", ["paged_attention_scores", "lisa_attention", "lisa_attention_no_scores_out"])
def test_opcheck(device, name):
    kw = lisa_case(device)
    if name == "paged_attention_scores":
        q = torch.randn(5, 4, 64, device=device)
        args = (torch.empty_like(q), torch.zeros(5, 4, 23, device=device), q, torch.randn_like(kw["value_cache"]),
                kw["value_cache"], kw["block_tables"], kw["cu_query_lens"], kw["seq_lens"], 0.125)
    else:
        if name == "lisa_attention_no_scores_out":
            kw["scores_out"] = None
        args = tuple(kw.values())
    torch.library.opcheck(getattr(torch.ops.lisa_rt, name.replace("_no_scores_out", "")).default, args)
