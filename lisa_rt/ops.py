"""Typed wrappers over torch.ops.lisa_rt.* (the compiled kernels in lisa_rt._C).

Every op writes into tensors it is given, so the decode step allocates nothing. When `_C`
is absent (an install without a compiler) the ops fall back to reference.py, slower but the
same results; `HAVE_KERNELS` says which path is active.
"""
from __future__ import annotations

import torch

from . import reference
from .quant import QuantizedWeight

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.lisa_rt.*)

    HAVE_KERNELS = True
    KERNELS_ERROR: str | None = None
except ImportError as exc:  # not built, or built and not loadable (KERNELS_ERROR says why)
    HAVE_KERNELS = False
    KERNELS_ERROR = str(exc)

OP_NAMES = ("rms_norm", "fused_add_rms_norm", "rotary_cache_write", "linear", "linear_quantized", "silu_and_mul",
            "paged_decode_attention", "paged_prefill_attention", "paged_attention_scores", "lisa_attention",
            "causal_head_align", "causal_head_align_backward")

if HAVE_KERNELS:
    _ops = torch.ops.lisa_rt

    # The ops mutate their arguments and return nothing, so shape inference has nothing to do;
    # registering fakes lets torch.compile and opcheck trace through them.
    for _name in OP_NAMES:
        torch.library.register_fake(f"lisa_rt::{_name}")(lambda *args, **kwargs: None)


def kernel_threads() -> int:
    """Threads the compiled CPU kernels' parallel regions run on: torch.get_num_threads(), unless
    _C was built without OpenMP (then 1, as the reference path's own loops are)."""
    return int(_ops.kernel_threads()) if HAVE_KERNELS else 1


def kernel_isa() -> str:
    """The instruction-set path of the compiled CPU kernels on this CPU: "avx512-bf16", "avx2" or
    "portable" (ATEN_CPU_CAPABILITY=avx2 or =default lowers it, as it lowers torch's own), or
    "reference" without _C."""
    return str(_ops.kernel_isa()) if HAVE_KERNELS else "reference"


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


def rotary_cache_write(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       cos_sin_cache: torch.Tensor) -> None:
    """RoPE in place on query and key at positions, then the rotated key and value into the
    caches at slot_mapping (negative slots skipped)."""
    if HAVE_KERNELS:
        _ops.rotary_cache_write(positions, query, key, value, key_cache, value_cache, slot_mapping, cos_sin_cache)
    else:
        results = reference.rotary_cache_write(positions, query, key, value, key_cache, value_cache,
                                               slot_mapping, cos_sin_cache)
        for dst, src in zip((query, key, key_cache, value_cache), results):
            dst.copy_(src)


def linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """out = x @ weight^T; on the CPU, decode-sized x streams the weights on every core. A
    QuantizedWeight (quant.py) runs linear_quantized."""
    if isinstance(weight, QuantizedWeight):
        if HAVE_KERNELS:
            _ops.linear_quantized(out, x, weight.data, weight.scales, weight.mins)
        else:
            out.copy_(reference.linear_quantized(x, weight))
        return out
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


def paged_attention_scores(out: torch.Tensor, scores: torch.Tensor, query: torch.Tensor,
                           key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                           cu_query_lens: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_prefill_attention that also writes the scaled pre-mask logits of the visible keys
    into scores (float32 [T, h, max_keys]) for a following LiSA layer."""
    if HAVE_KERNELS:
        _ops.paged_attention_scores(out, scores, query, key_cache, value_cache, block_tables,
                                    cu_query_lens, seq_lens, scale)
    else:
        want_out, want_scores = reference.attention_scores(query, key_cache, value_cache, block_tables,
                                                           cu_query_lens, seq_lens, scale, scores.shape[2])
        out.copy_(want_out)
        _copy_visible(scores, want_scores, cu_query_lens, seq_lens)
    return out


def lisa_attention(out: torch.Tensor, scores_out: torch.Tensor | None, scores_prev: torch.Tensor,
                   query_lr: torch.Tensor, key_lr_cache: torch.Tensor, value_cache: torch.Tensor,
                   block_tables: torch.Tensor, cu_query_lens: torch.Tensor, seq_lens: torch.Tensor,
                   align_a: torch.Tensor, align_w1: torch.Tensor, align_b1: torch.Tensor,
                   align_w2: torch.Tensor, align_b2: torch.Tensor, delta_scale: float) -> torch.Tensor:
    """LiSA attention (DESIGN section 3); scores_out, when given, receives this layer's logits
    (must not overlap scores_prev: a chain ping-pongs two buffers)."""
    if HAVE_KERNELS:
        _ops.lisa_attention(out, scores_out, scores_prev, query_lr, key_lr_cache, value_cache, block_tables,
                            cu_query_lens, seq_lens, align_a, align_w1, align_b1, align_w2, align_b2,
                            delta_scale)
    else:
        want_out, want_scores = reference.lisa_attention(scores_prev, query_lr, key_lr_cache, value_cache,
                                                         block_tables, cu_query_lens, seq_lens, align_a,
                                                         align_w1, align_b1, align_w2, align_b2, delta_scale)
        out.copy_(want_out)
        if scores_out is not None:
            _copy_visible(scores_out, want_scores, cu_query_lens, seq_lens)
    return out


def causal_head_align(out: torch.Tensor, scores: torch.Tensor, align_a: torch.Tensor, align_w1: torch.Tensor,
                      align_b1: torch.Tensor, align_w2: torch.Tensor, align_b2: torch.Tensor) -> torch.Tensor:
    """The head aligner over whole causal logits [B, h, n, n] (0 past the diagonal), for the
    fitter; the kernel is CPU-only, other devices take the reference."""
    if HAVE_KERNELS and scores.device.type == "cpu":
        _ops.causal_head_align(out, scores, align_a, align_w1, align_b1, align_w2, align_b2)
    else:
        out.copy_(reference.causal_head_align(scores, align_a, align_w1, align_b1, align_w2, align_b2))
    return out


def causal_head_align_backward(grads: list[torch.Tensor], grad_out: torch.Tensor, scores: torch.Tensor,
                               align_a: torch.Tensor, align_w1: torch.Tensor, align_b1: torch.Tensor,
                               align_w2: torch.Tensor) -> None:
    """Writes the gradients of causal_head_align's scores, A, W1, b1, W2 and b2 (in that order,
    into grads) from grad_out."""
    if HAVE_KERNELS and scores.device.type == "cpu":
        _ops.causal_head_align_backward(*grads, grad_out, scores, align_a, align_w1, align_b1, align_w2)
        return
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (scores, align_a, align_w1, align_b1, align_w2)]
        b2 = torch.zeros(align_a.shape[0], device=scores.device, requires_grad=True)
        aligned = reference.causal_head_align(*inputs, b2)
        for grad, want in zip(grads, torch.autograd.grad(aligned, [*inputs, b2], grad_out)):
            grad.copy_(want)


def _copy_visible(dst: torch.Tensor, src: torch.Tensor, cu_query_lens: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """dst[t, :, j] = src[t, :, j] for the keys visible to row t; other columns untouched."""
    n = min(dst.shape[2], src.shape[2])
    mask = reference.visible_keys(cu_query_lens.cpu(), seq_lens.cpu(), n).to(dst.device)[:, None, :]
    dst[:, :, :n] = torch.where(mask, src[:, :, :n].to(dst.device), dst[:, :, :n])
