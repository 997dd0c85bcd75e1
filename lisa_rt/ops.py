"""Typed wrappers over torch.ops.lisa_rt.* (the compiled kernels in lisa_rt._C).

Every op writes into tensors it is given, so the decode step allocates nothing. When `_C`
is absent (an install without a compiler) the ops fall back to reference.py, slower but the
same results; `HAVE_KERNELS` says which path is active.
"""
from __future__ import annotations

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.lisa_rt.*)

    HAVE_KERNELS = True
except ImportError:
    HAVE_KERNELS = False

OP_NAMES = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "linear", "silu_and_mul", "cache_write",
            "paged_decode_attention", "paged_prefill_attention")

if HAVE_KERNELS:
    _ops = torch.ops.lisa_rt

    # The ops mutate their arguments and return nothing, so shape inference has nothing to do;
    # registering fakes lets torch.compile and opcheck trace through them.
    for _name in OP_NAMES:
        torch.library.register_fake(f"lisa_rt::{_name}")(lambda *args, **kwargs: None)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if HAVE_KERNELS:
        _ops.rms_norm(out, x, weight, eps)
    else:
        out.copy_(reference.rms_norm(x, weight, eps))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    """residual += x, then x = rms_norm(residual) * weight, both in place."""
    if HAVE_KERNELS:
        _ops.fused_add_rms_norm(x, residual, weight, eps)
    else:
        normed, new_residual = reference.fused_add_rms_norm(x, residual, weight, eps)
        residual.copy_(new_residual)
        x.copy_(normed)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    if HAVE_KERNELS:
        _ops.rotary_embedding(positions, query, key, cos_sin_cache)
    else:
        query.copy_(reference.rotary_embedding(positions, query, cos_sin_cache))
        key.copy_(reference.rotary_embedding(positions, key, cos_sin_cache))


def linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out = x @ weight^T; on the CPU, decode-sized x streams the weights on every core."""
    if HAVE_KERNELS:
        _ops.linear(out, x, weight)
    else:
        torch.mm(x, weight.t(), out=out)
    return out


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if HAVE_KERNELS:
        _ops.silu_and_mul(out, x)
    else:
        out.copy_(reference.silu_and_mul(x))
    return out


def cache_write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if HAVE_KERNELS:
        _ops.cache_write(key, value, key_cache, value_cache, slot_mapping)
    else:
        new_k, new_v = reference.cache_write(key, value, key_cache, value_cache, slot_mapping)
        key_cache.copy_(new_k)
        value_cache.copy_(new_v)


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if HAVE_KERNELS:
        _ops.paged_decode_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
    else:
        out.copy_(reference.paged_decode_attention(query, key_cache, value_cache, block_tables,
                                                   seq_lens, scale))
    return out


def paged_prefill_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_query_lens: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    if HAVE_KERNELS:
        _ops.paged_prefill_attention(out, query, key_cache, value_cache, block_tables,
                                     cu_query_lens, seq_lens, scale)
    else:
        out.copy_(reference.paged_prefill_attention(query, key_cache, value_cache, block_tables,
                                                    cu_query_lens, seq_lens, scale))
    return out
