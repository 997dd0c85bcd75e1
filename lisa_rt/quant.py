"""Weights quantized in blocks of 32 along the input dimension, for CPU decode.

Decode streams every weight once per step, so its speed on the CPU is the memory bandwidth over
the weights' bytes. Two formats, llama.cpp's arithmetic in a layout of lisa-rt's own:
- q8_0: w = d q, q int8 in [-127, 127], d = the block's largest |w| / 127 (8.5 bits a weight);
- q4_1: w = d q + m, q in 0..15, m = the block's smallest w, d = (largest - m) / 15 (5 bits a
  weight). The default model's GGUF is q4_1 (Q4_1), so it loses nearly nothing more here.
As in llama.cpp, a q8_0 block whose largest |w| is below about 8e-3 has a float16 subnormal d
(fewer significant bits), and one below about 4e-6 a d of 0: the block reads as zeros.
d and m are float16 [N, K / 32]; a q4_1 block's 16 bytes hold its first 16 q in their low
nibbles and its last 16 in their high ones. The kernel is `linear_quantized` (CPU only); it
quantizes its input rows to 8 bits in blocks of 32 too (quantized_input), as llama.cpp does, so
that its block products are integer ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

BLOCK = 32
FORMATS = ("q8_0", "q4_1")


@dataclass
class QuantizedWeight:
    """A weight [N, K] as its blocks: data int8 [N, K] (q8_0) or uint8 [N, K / 2] (q4_1),
    scales (and q4_1's mins) float16 [N, K / 32]."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * BLOCK

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scales, self.mins) if t is not None]

    def with_tensors(self, tensors: list[torch.Tensor]) -> "QuantizedWeight":
        """The same weight over other storage of the same tensors (tensors() order)."""
        return QuantizedWeight(self.format, *tensors)


def quantize(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """weight [N, K] (any float dtype; K a multiple of 32) in `format`."""
    if format not in FORMATS:
        raise UserError(f"unknown weight format {format!r} (choose from {', '.join(FORMATS)})")
    n, k = weight.shape
    if k % BLOCK:
        raise UserError(f"a {n} x {k} weight cannot be quantized: its rows must be a multiple of {BLOCK} long")
    blocks = weight.detach().to(torch.float32).reshape(n, k // BLOCK, BLOCK)
    if format == "q8_0":
        scale = (blocks.abs().amax(dim=-1) / 127).to(torch.float16)
        d = scale.to(torch.float32).unsqueeze(-1)
        q = torch.where(d > 0, blocks / d.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        q = q.round().clamp_(-127, 127).to(torch.int8)
        return _checked(QuantizedWeight(format, q.reshape(n, k).contiguous(), scale.contiguous()))
    low = blocks.amin(dim=-1)
    scale = ((blocks.amax(dim=-1) - low) / 15).to(torch.float16)
    mins = low.to(torch.float16)
    d, m = scale.to(torch.float32).unsqueeze(-1), mins.to(torch.float32).unsqueeze(-1)
    q = torch.where(d > 0, (blocks - m) / d.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    q = q.round().clamp_(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return _checked(QuantizedWeight(format, packed.reshape(n, k // 2).contiguous(), scale.contiguous(),
                                    mins.contiguous()))


def _checked(weight: QuantizedWeight) -> QuantizedWeight:
    if not all(bool(torch.isfinite(t).all()) for t in (weight.scales, weight.mins) if t is not None):
        raise UserError(f"a {weight.shape[0]} x {weight.shape[1]} weight cannot be quantized to {weight.format}: "
                        "it holds values past float16's range (or not finite)")
    return weight


def quantized_input(x: torch.Tensor) -> torch.Tensor:
    """What linear_quantized multiplies input rows x [rows, K] as: each block of 32 as 8-bit
    integers times the block's largest |x| / 127 (rounded to nearest even), in float32."""
    rows, k = x.shape
    blocks = x.to(torch.float32).reshape(rows, k // BLOCK, BLOCK)
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    # Quotients through float64, then rounded once to float32: exactly the kernel's float32
    # division (torch's own float32 division by a tensor can differ from it in the last bit).
    wide = largest.double()
    inverse = (127.0 / wide).float()
    # A block too small for 127 / largest counts as zeros; a non-finite one gives NaN (below).
    inverse = torch.where((largest > 0) & torch.isfinite(inverse), inverse, torch.zeros_like(inverse))
    out = torch.round(blocks * inverse) * (wide / 127.0).float()
    out = torch.where(torch.isfinite(blocks).all(dim=-1, keepdim=True), out, torch.nan)
    return out.reshape(rows, k)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The float32 [N, K] the blocks stand for."""
    n, k = weight.shape
    d = weight.scales.to(torch.float32).unsqueeze(-1)
    if weight.format == "q8_0":
        return (weight.data.reshape(n, k // BLOCK, BLOCK).to(torch.float32) * d).reshape(n, k)
    packed = weight.data.reshape(n, k // BLOCK, BLOCK // 2)
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32)
    return (q * d + weight.mins.to(torch.float32).unsqueeze(-1)).reshape(n, k)
