"""Pure-torch reference of every op and of a whole decoder.

This is the test oracle for the C++/CUDA kernels and the fallback when the compiled `_C`
library is absent. Clarity over speed: every function computes in float32 and returns a new
tensor; the in-place op wrappers in ops.py copy the result into their output.
"""
from __future__ import annotations

import math

import torch

from .quant import QuantizedWeight, dequantize, quantized_input


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual) with new_residual = x + residual."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm(new_residual, weight, eps).to(x.dtype), new_residual


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies of RoPE, with llama3-style scaling of the low frequencies."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, blended, scaled)


def rope_cos_sin_cache(head_dim: int, max_positions: int, theta: float,
                       scaling: dict | None = None) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).float()
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()


def rotary_embedding(positions: torch.Tensor, x: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """HF half-rotation RoPE on x [T, heads, head_dim] at the given positions [T]."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache[positions.long()]
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, K] @ weight [N, K]^T, accumulated in float32."""
    return (x.float() @ weight.float().T).to(x.dtype)


def linear_quantized(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [rows, K] as its 8-bit blocks stand for it, @ the float32 weight a QuantizedWeight
    stands for, transposed."""
    return (quantized_input(x) @ dequantize(weight).T).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] holds gate then up; returns silu(gate) * up, [N, I]."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :half]) * xf[..., half:]).to(x.dtype)


def cache_write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches are [num_blocks, block_size, kv_heads, head_dim]; slot = block * block_size + offset.

    Returns updated copies; negative slots are skipped (padding).
    """
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    block_size = key_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = key[token]
        value_cache[slot // block_size, slot % block_size] = value[token]
    return key_cache, value_cache


def rotary_cache_write(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rotated query and key, and the caches with the rotated key and the value written at
    slot_mapping: the op rotary_cache_write's results, as new tensors."""
    query = rotary_embedding(positions, query, cos_sin_cache)
    key = rotary_embedding(positions, key, cos_sin_cache)
    return (query, key, *cache_write(key, value, key_cache, value_cache, slot_mapping))


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache: [length, kv_heads, dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def packed_chunks(cu_query_lens: torch.Tensor, seq_lens: torch.Tensor):
    """(sequence, first row, end row, cached length) of every non-empty chunk of a packed call."""
    starts = cu_query_lens.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        if starts[b + 1] > starts[b]:
            yield b, starts[b], starts[b + 1], length


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              first_position: int) -> torch.Tensor:
    """Causal attention of queries at positions first_position.. over keys 0..n-1 (GQA aware).

    query [q, heads, dim], key/value [n, kv_heads, dim]; returns [q, heads, dim].
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    group = heads // kv_heads
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), k) * scale
    q_pos = torch.arange(query.shape[0], device=query.device)[:, None] + first_position
    k_pos = torch.arange(key.shape[0], device=query.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One new query per sequence ([batch, heads, dim]) attending to its whole cached context."""
    out = torch.empty_like(query)
    for b, length in enumerate(seq_lens.tolist()):
        k = gather_paged(key_cache, block_tables[b], length)
        v = gather_paged(value_cache, block_tables[b], length)
        out[b] = attention(query[b : b + 1], k, v, scale, length - 1)[0]
    return out


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Packed chunks of queries ([tokens, heads, dim]); sequence b's chunk is its last tokens.

    cu_query_lens [batch + 1] delimits each sequence's queries; seq_lens [batch] counts every
    cached token including the chunk, so the chunk starts at position seq_len - chunk_len.
    """
    out = torch.empty_like(query)
    for b, lo, hi, length in packed_chunks(cu_query_lens, seq_lens):
        k = gather_paged(key_cache, block_tables[b], length)
        v = gather_paged(value_cache, block_tables[b], length)
        out[lo:hi] = attention(query[lo:hi], k, v, scale, length - (hi - lo))
    return out


def llama_forward(config, tensors: dict[str, torch.Tensor], token_ids: list[int], adapter=None) -> torch.Tensor:
    """Dense float32 forward of one sequence; returns logits [len, vocab]. The model-level oracle.

    With a LiSA adapter (lisa.Adapter) its layers attend with the aligned logits of the layer
    before plus the low-rank delta (DESIGN section 3), on full [heads, n, n] logits.
    """
    t = {name: w.float() for name, w in tensors.items()}
    n = len(token_ids)
    positions = torch.arange(n)
    cache = rope_cos_sin_cache(config.head_dim, n, config.rope_theta, config.rope_scaling)
    lisa_layers = set(adapter.config.layers) if adapter is not None else set()
    if adapter is not None:
        rank = adapter.config.rank
        lisa_cache = rope_cos_sin_cache(rank, n, config.rope_theta, config.rope_scaling)
    x = t["embed.weight"][torch.tensor(token_ids)]
    scale = 1.0 / math.sqrt(config.head_dim)
    logits = None  # the previous layer's [heads, n, n] attention logits
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        h = rms_norm(x, t[p + "attn_norm.weight"], config.rms_norm_eps)
        v = (h @ t[p + "attn.v_proj.weight"].T).view(n, config.num_kv_heads, config.head_dim)
        if layer in lisa_layers:
            w = {name: value.float() for name, value in adapter.layer(layer).items()}
            q_lr = rotary_embedding(positions, (h @ w["q_proj"].T).view(n, config.num_heads, rank), lisa_cache)
            k_lr = rotary_embedding(positions, (h @ w["k_proj"].T).view(n, config.num_kv_heads, rank), lisa_cache)
            logits = lisa_scores(logits, q_lr, k_lr, w["align_a"], w["align_w1"], w["align_b1"],
                                 w["align_w2"], w["align_b2"], 1.0 / math.sqrt(rank))
        else:
            q = (h @ t[p + "attn.q_proj.weight"].T).view(n, config.num_heads, config.head_dim)
            k = (h @ t[p + "attn.k_proj.weight"].T).view(n, config.num_kv_heads, config.head_dim)
            q, k = rotary_embedding(positions, q, cache), rotary_embedding(positions, k, cache)
            logits = lowrank_delta(q, k, scale)  # the same product: scale * q . k per head pair
        o = attend_logits(logits, v, 0).reshape(n, -1)
        x = x + o @ t[p + "attn.o_proj.weight"].T
        h = rms_norm(x, t[p + "mlp_norm.weight"], config.rms_norm_eps)
        gate_up = torch.cat([h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T], -1)
        x = x + silu_and_mul(gate_up) @ t[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, t["norm.weight"], config.rms_norm_eps)
    head = t["embed.weight"] if config.tie_word_embeddings else t["lm_head.weight"]
    return x @ head.T


# --- LiSA attention (DESIGN section 3) ---

def align_scores(s_prev: torch.Tensor, A: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor,
                 W2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The head aligner on dense logits: s_prev [h, q, n] -> A a + W2 silu(W1 a + b1) + b2 per (q, n).

    a = s_prev[:, i, j] is the vector over heads; A [h, h], W1 [m, h], b1 [m], W2 [h, m], b2 [h].
    Float32; differentiable (the fitting code reuses it).
    """
    a = s_prev.float().permute(1, 2, 0)  # [q, n, h]
    hidden = torch.nn.functional.silu(a @ W1.float().T + b1.float())
    aligned = a @ A.float().T + hidden @ W2.float().T + b2.float()
    return aligned.permute(2, 0, 1)


def causal_head_align(scores: torch.Tensor, A: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor,
                      W2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """align_scores over whole causal logits scores [B, h, n, n]: keys j <= i aligned, j > i 0
    (and never read, so whatever they hold cannot reach the result or its gradients)."""
    n = scores.shape[-1]
    visible = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    a = torch.where(visible, scores.float(), 0.0)
    aligned = torch.stack([align_scores(a[b], A, W1, b1, W2, b2) for b in range(a.shape[0])])
    return torch.where(visible, aligned, 0.0)


def lowrank_delta(q_lr: torch.Tensor, k_lr: torch.Tensor, delta_scale: float) -> torch.Tensor:
    """dS [h, q, n] = delta_scale * q'_i . k'_j, q_lr [q, h, r], k_lr [n, g, r] (GQA aware)."""
    group = q_lr.shape[1] // k_lr.shape[1]
    k = k_lr.float().repeat_interleave(group, dim=1)
    return torch.einsum("qhr,khr->hqk", q_lr.float(), k) * delta_scale


def lisa_scores(s_prev: torch.Tensor, q_lr: torch.Tensor, k_lr: torch.Tensor, A: torch.Tensor,
                W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor,
                delta_scale: float) -> torch.Tensor:
    """S [h, q, n] = align_scores(s_prev) + lowrank_delta(q_lr, k_lr): the LiSA layer's logits."""
    return align_scores(s_prev, A, W1, b1, W2, b2) + lowrank_delta(q_lr, k_lr, delta_scale)


def attend_logits(logits: torch.Tensor, value: torch.Tensor, first_position: int) -> torch.Tensor:
    """Causal softmax of logits [h, q, n] (query i at position first_position + i sees keys
    0..first_position + i) times value [n, g, d] (GQA aware); returns [q, h, d] float32."""
    heads, q, n = logits.shape
    v = value.float().repeat_interleave(heads // value.shape[1], dim=1)
    q_pos = torch.arange(q, device=logits.device)[:, None] + first_position
    k_pos = torch.arange(n, device=logits.device)[None, :]
    probs = torch.softmax(logits.float().masked_fill(k_pos > q_pos, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def visible_keys(cu_query_lens: torch.Tensor, seq_lens: torch.Tensor, max_keys: int) -> torch.Tensor:
    """bool [tokens, max_keys]: key j is visible to packed query row t (j <= its position)."""
    mask = torch.zeros(int(cu_query_lens[-1]), max_keys, dtype=torch.bool)
    for _, lo, hi, length in packed_chunks(cu_query_lens, seq_lens):
        for t in range(lo, hi):
            mask[t, : length - (hi - t) + 1] = True
    return mask


def attention_scores(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, cu_query_lens: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, max_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """paged_prefill_attention plus its logits: returns (out [T, h, d], scores float32
    [T, h, max_keys]) with scores[t, hd, j] = scale * q . k_j for visible j, zero elsewhere."""
    out = paged_prefill_attention(query, key_cache, value_cache, block_tables, cu_query_lens, seq_lens, scale)
    tokens, heads = query.shape[:2]
    scores = torch.zeros(tokens, heads, max_keys, dtype=torch.float32, device=query.device)
    for b, lo, hi, length in packed_chunks(cu_query_lens, seq_lens):
        k = gather_paged(key_cache, block_tables[b], length)
        logits = lowrank_delta(query[lo:hi], k, scale)  # [h, q, n]: the same product
        first = length - (hi - lo)
        for i in range(hi - lo):
            scores[lo + i, :, : first + i + 1] = logits[:, i, : first + i + 1]
    return out, scores


def lisa_attention(scores_prev: torch.Tensor, query_lr: torch.Tensor, key_lr_cache: torch.Tensor,
                   value_cache: torch.Tensor, block_tables: torch.Tensor, cu_query_lens: torch.Tensor,
                   seq_lens: torch.Tensor, A: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor,
                   W2: torch.Tensor, b2: torch.Tensor, delta_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA attention of packed query chunks over the paged caches (see lisa_scores).

    scores_prev float32 [T, h, max_keys] (only visible columns are read); returns
    (out [T, h, d] in value_cache's dtype, scores float32 [T, h, max_keys]: S for visible
    columns, zero elsewhere).
    """
    tokens, heads = query_lr.shape[:2]
    out = torch.zeros(tokens, heads, value_cache.shape[-1], dtype=value_cache.dtype, device=query_lr.device)
    scores = torch.zeros(tokens, heads, scores_prev.shape[2], dtype=torch.float32, device=query_lr.device)
    for b, lo, hi, length in packed_chunks(cu_query_lens, seq_lens):
        first = length - (hi - lo)
        visible = visible_keys(torch.tensor([0, hi - lo]), torch.tensor([length]), length)
        # Invisible columns may hold anything (even NaN): zero them before the aligner.
        s_prev = scores_prev[lo:hi, :, :length].float().masked_fill(~visible[:, None, :], 0.0)
        k_lr = gather_paged(key_lr_cache, block_tables[b], length)
        v = gather_paged(value_cache, block_tables[b], length)
        logits = lisa_scores(s_prev.permute(1, 0, 2), query_lr[lo:hi], k_lr, A, W1, b1, W2, b2, delta_scale)
        out[lo:hi] = attend_logits(logits, v, first).to(value_cache.dtype)
        scores[lo:hi, :, :length] = logits.permute(1, 0, 2).masked_fill(~visible[:, None, :], 0.0)
    return out, scores
