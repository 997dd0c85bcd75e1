"""Every op against reference.py on random inputs of awkward sizes, on each device and dtype."""
import math

import pytest
import torch

from lisa_rt import ops, reference
from tests.op_testing import poison, random_block_tables  # the device and dtype fixtures live in conftest.py

pytestmark = pytest.mark.skipif(not ops.HAVE_KERNELS, reason="lisa_rt._C is not built")

# Tolerances per dtype: float32 arithmetic, or one rounding of a bf16/fp16 output.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (33, 1000)])
def test_rms_norm(device, dtype, rows, hidden):
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
    out = poison(torch.empty_like(x))
    ops.rms_norm(out, x, w, 1e-5)
    close(out, reference.rms_norm(x.cpu(), w.cpu(), 1e-5), dtype)


@pytest.mark.parametrize("rows,hidden", [(1, 64), (9, 576), (17, 1000)])
def test_fused_add_rms_norm(device, dtype, rows, hidden):
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    res = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
    want_out, want_res = reference.fused_add_rms_norm(x.cpu(), res.cpu(), w.cpu(), 1e-6)
    ops.fused_add_rms_norm(x, res, w, 1e-6)
    close(res, want_res, dtype)
    close(x, want_out, dtype)


def make_cache(num_blocks, block_size, kv_heads, dim, device, dtype):
    shape = (num_blocks, block_size, kv_heads, dim)
    return (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))


@pytest.mark.parametrize("tokens,heads,kv_heads,dim", [(1, 4, 4, 64), (13, 9, 3, 64), (37, 8, 2, 128)])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_cache_write(device, dtype, tokens, heads, kv_heads, dim, scaling):
    cache = reference.rope_cos_sin_cache(dim, 512, 10000.0, scaling).to(device)
    positions = torch.randint(0, 512, (tokens,), device=device)
    # q, k and v are row-strided slices of one fused projection, as the decoder passes them.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    key_cache, value_cache = make_cache(8, 16, kv_heads, dim, device, dtype)
    slots = torch.randperm(8 * 16, device=device)[:tokens]
    slots[tokens // 2] = -1  # a padding token is rotated but not cached
    want_q, want_k, want_kc, want_vc = reference.rotary_cache_write(
        positions.cpu(), q.cpu(), k.cpu(), v.cpu(), key_cache.cpu(), value_cache.cpu(), slots.cpu(), cache.cpu())
    untouched = v.clone()
    ops.rotary_cache_write(positions, q, k, v, key_cache, value_cache, slots, cache)
    close(q, want_q, dtype)
    close(k, want_k, dtype)
    assert torch.equal(v, untouched)
    close(key_cache, want_kc, dtype)
    assert torch.equal(value_cache.cpu(), want_vc)
    # The cache holds exactly the keys the op rotated in place.
    written = slots >= 0
    flat = key_cache.view(-1, kv_heads, dim)
    assert torch.equal(flat[slots[written]], k[written])


@pytest.mark.parametrize("rank,value_dim", [(8, 64), (6, 128), (16, 2)])
def test_rotary_cache_write_key_and_value_widths_differ(device, dtype, rank, value_dim):
    """A LiSA layer rotates rank-r queries and keys and caches them beside full values."""
    tokens, heads, kv_heads, block_size = 21, 6, 3, 16
    cache = reference.rope_cos_sin_cache(rank, 256, 10000.0).to(device)
    positions = torch.randint(0, 256, (tokens,), device=device)
    q = torch.randn(tokens, heads, rank, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, rank, device=device, dtype=dtype)
    v = torch.randn(tokens, kv_heads, value_dim, device=device, dtype=dtype)
    key_cache = torch.zeros(4, block_size, kv_heads, rank, device=device, dtype=dtype)
    value_cache = torch.zeros(4, block_size, kv_heads, value_dim, device=device, dtype=dtype)
    slots = torch.randperm(4 * block_size, device=device)[:tokens]
    want_q, want_k, want_kc, want_vc = reference.rotary_cache_write(
        positions.cpu(), q.cpu(), k.cpu(), v.cpu(), key_cache.cpu(), value_cache.cpu(), slots.cpu(), cache.cpu())
    ops.rotary_cache_write(positions, q, k, v, key_cache, value_cache, slots, cache)
    close(q, want_q, dtype)
    close(k, want_k, dtype)
    close(key_cache, want_kc, dtype)
    assert torch.equal(value_cache.cpu(), want_vc)


def test_rotary_cache_write_rejects_a_bad_position_or_slot_before_writing():
    cache = reference.rope_cos_sin_cache(8, 32, 10000.0)
    q, k, v = torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    key_cache, value_cache = make_cache(2, 16, 1, 8, "cpu", torch.float32)
    before = [t.clone() for t in (q, k, key_cache, value_cache)]
    for positions, slots, message in (([0, 1, 32], [0, 1, 2], "position 32 out of range"),
                                      ([0, 1, 2], [0, 32, 2], "slot 32 beyond the cache")):
        with pytest.raises(RuntimeError, match=message):
            ops.rotary_cache_write(torch.tensor(positions), q, k, v, key_cache, value_cache, torch.tensor(slots),
                                   cache)
        assert all(torch.equal(t, b) for t, b in zip((q, k, key_cache, value_cache), before))


@pytest.mark.parametrize("rows,k,n", [(1, 576, 960), (3, 64, 1000), (7, 576, 1000), (8, 1536, 50), (5, 72, 33),
                                        (2, 75, 40), (2, 96, 40), (5, 160, 33), (4, 0, 7), (20, 64, 64),
                                        (6, 1000, 17), (1, 2048, 130), (8, 1024, 41), (9, 576, 64),
                                        (70, 64, 40000)])
def test_linear(device, dtype, rows, k, n):
    """Decode-sized inputs (the streaming CPU kernels: float32 with k % 8 == 0 or not, bfloat16
    with k % 32 == 0 or not, and float16 and bfloat16 without AVX512-BF16 up to 64 rows with k %
    8 == 0 or not; several L2 tiles, row groups of 3, 2 and 1; the CUDA GEMV: 1-8 rows, a partial
    last vector chunk, the longest rows it takes and one past them) and larger ones (at::mm,
    cuBLAS; float16, and bfloat16 without AVX512-BF16, through float32 a block of weight rows at a
    time, two blocks in the last case)."""
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    out = poison(torch.empty(rows, n, device=device, dtype=dtype))
    ops.linear(out, x, w)
    want = reference.linear(x.cpu(), w.cpu())
    # Sums of k products in a different order: float32 rounding grows with sqrt(k).
    atol = 1e-4 if dtype == torch.float32 else TOL[dtype][0]
    torch.testing.assert_close(out.float().cpu(), want.float(), atol=atol, rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_of_no_rows_on_the_cpu(dtype):
    """No input rows: an empty product, nothing else (the streaming kernels plan passes by rows)."""
    out = torch.empty(0, 70, dtype=dtype)
    assert ops.linear(out, torch.empty(0, 64, dtype=dtype), torch.randn(70, 64).to(dtype)).shape == (0, 70)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_linear_rows_do_not_depend_on_their_batch(dtype):
    """The CUDA GEMV sums each output in a fixed order: a row's result, bit for bit, is the same
    alone and in a batch of up to 8 (the padded batches of CUDA-graph decode)."""
    x = torch.randn(8, 576, device="cuda", dtype=dtype)
    w = torch.randn(960, 576, device="cuda", dtype=dtype) / 24
    alone = torch.stack([ops.linear(torch.empty(1, 960, device="cuda", dtype=dtype), x[r:r + 1], w)[0]
                         for r in range(8)])
    for rows in (2, 3, 4, 8):
        batched = ops.linear(torch.empty(rows, 960, device="cuda", dtype=dtype), x[:rows], w)
        assert torch.equal(batched, alone[:rows])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_rows_do_not_depend_on_their_batch(dtype):
    """The split decode attention divides a token's keys by the batch's next power of two: a
    batch of 3 and the same rows padded (length 0, as CUDA-graph padding) to 4 give the same
    outputs bit for bit, at LLaMA-2-7B's heads and contexts long enough to be split."""
    heads, dim, block_size, lengths = 32, 128, 16, [700, 1500, 333]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 4
    key_cache, value_cache = make_cache(num_blocks, block_size, heads, dim, "cuda", dtype)
    tables = random_block_tables(lengths + [0], block_size, num_blocks, "cuda")
    query = torch.randn(4, heads, dim, device="cuda", dtype=dtype)
    outs = []
    for padded in (False, True):
        rows = 4 if padded else 3
        seq_lens = torch.tensor((lengths + [0])[:rows], dtype=torch.int32, device="cuda")
        out = torch.zeros(rows, heads, dim, device="cuda", dtype=dtype)
        ops.paged_decode_attention(out, query[:rows].contiguous(), key_cache, value_cache, tables[:rows].contiguous(),
                                   seq_lens, 1 / math.sqrt(dim))
        outs.append(out[:3])
    assert torch.equal(outs[0], outs[1])



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[20, 7, 31], [700, 1500, 333]])
def test_decode_attention_rows_do_not_depend_on_their_block_tables_width(dtype, lengths):
    """A CUDA graph's block tables are as wide as the longest context it serves, an eager step's
    as its longest sequence: a short batch plans one split from the narrow tables and several
    from the wide ones (each sequence still using one), and long sequences plan alike. Outputs
    are the same bit for bit either way."""
    heads, dim, block_size = 32, 128, 16
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 4
    key_cache, value_cache = make_cache(num_blocks, block_size, heads, dim, "cuda", dtype)
    # Exactly as wide as the longest sequence, as build_batch pads them: the short case plans a
    # single split (the direct write), the wide tables several (the combine).
    narrow = random_block_tables(lengths, block_size, num_blocks, "cuda")[:, :math.ceil(max(lengths) / block_size)]
    narrow = narrow.contiguous()
    wide = torch.zeros(len(lengths), 8192 // block_size, dtype=torch.int32, device="cuda")
    wide[:, : narrow.shape[1]] = narrow
    query = torch.randn(len(lengths), heads, dim, device="cuda", dtype=dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    outs = []
    for tables in (narrow, wide):
        out = torch.zeros(len(lengths), heads, dim, device="cuda", dtype=dtype)
        ops.paged_decode_attention(out, query, key_cache, value_cache, tables, seq_lens, 1 / math.sqrt(dim))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("rows,width", [(1, 64), (5, 1536), (3, 1001)])
def test_silu_and_mul(device, dtype, rows, width):
    x = torch.randn(rows, 2 * width, device=device, dtype=dtype)
    out = poison(torch.empty(rows, width, device=device, dtype=dtype))
    ops.silu_and_mul(out, x)
    close(out, reference.silu_and_mul(x.cpu()), dtype)


# dim 12: the CPU's portable path; dim 72: the AVX2 path's 8-wide tail after 32-wide steps;
# [700]: one sequence split into several runs of keys whose partial softmaxes are merged;
# [0, 17]: a sequence with no keys yet attends to nothing (zeros, on the CPU).
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (8, 1, 64), (6, 2, 12), (6, 2, 72)])
@pytest.mark.parametrize("lengths", [[1], [16, 17, 5], [300, 33, 129, 1], [700], [0, 17]])
def test_paged_decode_attention(device, dtype, heads, kv_heads, dim, lengths):
    if device == "cuda" and dim % 8:
        pytest.skip("CUDA kernels take head sizes that are multiples of 8")
    if device == "cuda" and 0 in lengths:
        pytest.skip("on CUDA an empty sequence is CUDA-graph padding, whose output nobody reads")
    check_decode_attention(device, dtype, heads, kv_heads, dim, 16, lengths)


def check_decode_attention(device, dtype, heads, kv_heads, dim, block_size, lengths):
    """paged_decode_attention against the reference on random caches of these shapes."""
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 4
    key_cache, value_cache = make_cache(num_blocks, block_size, kv_heads, dim, device, dtype)
    tables = random_block_tables(lengths, block_size, num_blocks, device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    query = torch.randn(len(lengths), heads, dim, device=device, dtype=dtype)
    out = poison(torch.empty_like(query))
    scale = 1 / math.sqrt(dim)
    ops.paged_decode_attention(out, query, key_cache, value_cache, tables, seq_lens, scale)
    want = reference.paged_decode_attention(query.cpu(), key_cache.cpu(), value_cache.cpu(),
                                            tables.cpu(), seq_lens.cpu(), scale)
    close(out, want, dtype)


# Shapes the CUDA kernel takes by other paths: a group of 7 (the 8-head variant with a head
# idle), a group of 12 (a full 8-head chunk and a partial one), head dim 256 (a row over all 32
# lanes), one long sequence alone in 8-key blocks (more than 32 splits: two per combine lane),
# and LLaMA-3-8B's heads at 2,049 keys (64 splits of 33 keys: the last split gets none).
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,lengths", [
    (7, 1, 64, 16, [40, 3]), (12, 1, 64, 16, [300]), (4, 2, 256, 16, [500, 70]), (8, 1, 64, 8, [2100]),
    (32, 8, 128, 16, [2049])])
def test_paged_decode_attention_other_shapes(device, dtype, heads, kv_heads, dim, block_size, lengths):
    check_decode_attention(device, dtype, heads, kv_heads, dim, block_size, lengths)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 128)])
@pytest.mark.parametrize("chunks", [[(7, 7)], [(5, 21), (16, 16), (1, 40)], [(0, 3), (33, 100), (130, 130)]])
def test_paged_prefill_attention(device, dtype, heads, kv_heads, dim, chunks):
    """chunks: (chunk_len, seq_len) per sequence; the chunk is the sequence's last tokens."""
    block_size = 16
    lengths = [n for _, n in chunks]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 2
    key_cache, value_cache = make_cache(num_blocks, block_size, kv_heads, dim, device, dtype)
    tables = random_block_tables(lengths, block_size, num_blocks, device)
    cu = torch.tensor([0] + list(torch.tensor([c for c, _ in chunks]).cumsum(0)), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    tokens = int(cu[-1])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype)
    query = qkv[:, : heads * dim].view(tokens, heads, dim)
    out = poison(torch.empty(tokens, heads, dim, device=device, dtype=dtype))
    scale = 1 / math.sqrt(dim)
    ops.paged_prefill_attention(out, query, key_cache, value_cache, tables, cu, seq_lens, scale)
    want = reference.paged_prefill_attention(query.cpu(), key_cache.cpu(), value_cache.cpu(), tables.cpu(),
                                             cu.cpu(), seq_lens.cpu(), scale)
    close(out, want, dtype)


def test_decode_equals_last_row_of_prefill(device):
    """A decode step and the last query of a prefill over the same cache agree."""
    heads, kv_heads, dim, n = 6, 2, 64, 45
    key_cache, value_cache = make_cache(4, 16, kv_heads, dim, device, torch.float32)
    tables = torch.tensor([[2, 0, 3]], dtype=torch.int32, device=device)
    query = torch.randn(n, heads, dim, device=device)
    prefill = torch.empty_like(query)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    ops.paged_prefill_attention(prefill, query, key_cache, value_cache, tables, cu, lens, 0.125)
    decode = torch.empty_like(query[-1:])
    ops.paged_decode_attention(decode, query[-1:].contiguous(), key_cache, value_cache, tables, lens, 0.125)
    torch.testing.assert_close(decode, prefill[-1:], atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.empty_like(x), x, torch.ones(7, device=device), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):  # the kernels read the weight densely
        ops.fused_add_rms_norm(x.clone(), torch.randn_like(x), torch.ones(16, device=device)[::2], 1e-5)
    with pytest.raises(RuntimeError, match="twice"):
        ops.silu_and_mul(torch.empty(4, 3, device=device), x)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.rms_norm(torch.empty_like(x, dtype=torch.float16), x, torch.ones(8, device=device), 1e-5)
    with pytest.raises(RuntimeError, match="linear"):
        ops.linear(torch.empty(4, 5, device=device), x, torch.randn(5, 7, device=device))
    with pytest.raises(RuntimeError, match="overlap"):
        ops.linear(x, x, torch.randn(8, 8, device=device))


def opcheck_cases(device):
    dim, heads, kv_heads = 64, 4, 2
    x = torch.randn(3, 32, device=device)
    key_cache, value_cache = make_cache(3, 16, kv_heads, dim, device, torch.float32)
    tables = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 9], dtype=torch.int32, device=device)
    q = torch.randn(2, heads, dim, device=device)
    cache = reference.rope_cos_sin_cache(dim, 64, 10000.0).to(device)
    return {
        "rms_norm": (torch.empty_like(x), x, torch.ones(32, device=device), 1e-5),
        "fused_add_rms_norm": (x.clone(), torch.randn_like(x), torch.ones(32, device=device), 1e-5),
        "rotary_cache_write": (torch.tensor([0, 5], device=device), q.clone(),
                               torch.randn(2, kv_heads, dim, device=device), torch.randn(2, kv_heads, dim, device=device),
                               key_cache.clone(), value_cache.clone(), torch.tensor([3, 40], device=device), cache),
        "linear": (torch.empty(3, 24, device=device), x, torch.randn(24, 32, device=device)),
        "silu_and_mul": (torch.empty(3, 16, device=device), x),
        "paged_decode_attention": (torch.empty_like(q), q, key_cache, value_cache, tables, lens, 0.125),
        "paged_prefill_attention": (torch.empty(5, heads, dim, device=device), torch.randn(5, heads, dim, device=device),
                                    key_cache, value_cache, tables,
                                    torch.tensor([0, 3, 5], dtype=torch.int32, device=device), lens, 0.125),
    }


# The LiSA attention ops have their opcheck cases in test_lisa_ops.py, the fitter's aligner
# kernels theirs in test_head_align.py, the quantized linear (CPU only) its own in test_quant.py.
ELSEWHERE = ("paged_attention_scores", "lisa_attention", "causal_head_align", "causal_head_align_backward",
             "linear_quantized")


@pytest.mark.parametrize("name", [name for name in ops.OP_NAMES if name not in ELSEWHERE])
def test_opcheck(device, name):
    args = opcheck_cases(device)[name]
    torch.library.opcheck(getattr(torch.ops.lisa_rt, name).default, args)
