"""Pure-torch reference of every op and of a whole decoder.

This is the test oracle for the C++/CUDA kernels and the fallback when the compiled `_C`
library is absent. Clarity over speed: every function computes in float32 and returns a new
tensor; the in-place op wrappers in ops.py copy the result into their output.
"""
from __future__ import annotations

import math

import torch


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


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache: [length, kv_heads, dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


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
    starts = cu_query_lens.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k = gather_paged(key_cache, block_tables[b], length)
        v = gather_paged(value_cache, block_tables[b], length)
        out[lo:hi] = attention(query[lo:hi], k, v, scale, length - (hi - lo))
    return out


def llama_forward(config, tensors: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """Dense float32 forward of one sequence; returns logits [len, vocab]. The model-level oracle."""
    t = {name: w.float() for name, w in tensors.items()}
    n = len(token_ids)
    positions = torch.arange(n)
    cache = rope_cos_sin_cache(config.head_dim, n, config.rope_theta, config.rope_scaling)
    x = t["embed.weight"][torch.tensor(token_ids)]
    scale = 1.0 / math.sqrt(config.head_dim)
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        h = rms_norm(x, t[p + "attn_norm.weight"], config.rms_norm_eps)
        q = (h @ t[p + "attn.q_proj.weight"].T).view(n, config.num_heads, config.head_dim)
        k = (h @ t[p + "attn.k_proj.weight"].T).view(n, config.num_kv_heads, config.head_dim)
        v = (h @ t[p + "attn.v_proj.weight"].T).view(n, config.num_kv_heads, config.head_dim)
        q, k = rotary_embedding(positions, q, cache), rotary_embedding(positions, k, cache)
        o = attention(q, k, v, scale, 0).reshape(n, -1)
        x = x + o @ t[p + "attn.o_proj.weight"].T
        h = rms_norm(x, t[p + "mlp_norm.weight"], config.rms_norm_eps)
        gate_up = torch.cat([h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T], -1)
        x = x + silu_and_mul(gate_up) @ t[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, t["norm.weight"], config.rms_norm_eps)
    head = t["embed.weight"] if config.tie_word_embeddings else t["lm_head.weight"]
    return x @ head.T
