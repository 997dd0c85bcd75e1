"""GGUF (llama.cpp) -> lisa-rt: a self-contained reader, dequantisers and tokenizer rebuild.

The reader memory-maps the file and parses the header (versions 2 and 3), the metadata
key/values (every value type, arrays included), the tensor infos and the aligned data section.
Quantised tensors are dequantised to float32 with vectorised numpy, one whole tensor at a time.

Layout notes: GGUF lists a tensor's dims fastest-first (ne[0] is the row length), so the numpy
shape is the reversed list. llama.cpp's converter permutes the rows of Q and K so that its
interleaved ("GPT-J style") RoPE computes what HF's half-rotation RoPE computes on the original
rows; `unpermute_qk` undoes that, since lisa-rt uses the half-rotation convention.
"""
from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ModelConfig
from . import ConvertError, SourceModel, config_number, torch_dtype_of

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# --- metadata value types -------------------------------------------------------------------

_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, \
    _UINT64, _INT64, _FLOAT64 = range(13)

_SCALAR_DTYPES = {
    _UINT8: np.dtype("<u1"), _INT8: np.dtype("<i1"), _UINT16: np.dtype("<u2"),
    _INT16: np.dtype("<i2"), _UINT32: np.dtype("<u4"), _INT32: np.dtype("<i4"),
    _FLOAT32: np.dtype("<f4"), _BOOL: np.dtype("<u1"), _UINT64: np.dtype("<u8"),
    _INT64: np.dtype("<i8"), _FLOAT64: np.dtype("<f8"),
}

# --- tensor types: id -> (name, elements per block, bytes per block) --------------------------

GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


def type_name(type_id: int) -> str:
    return GGML_TYPES.get(type_id, (f"type {type_id}",))[0]


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first): the reverse of GGUF's ne
    type_id: int
    offset: int  # absolute offset in the file

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        return self.n_elements // block * size


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> python value, arrays as lists or numpy arrays),
    `tensors` (name -> TensorInfo) and `tensor(name)` -> float32 numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{self.path}: cannot read ({exc})") from None
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError) as exc:
            if isinstance(exc, ConvertError):
                raise
            raise ConvertError(f"{self.path}: truncated or corrupt GGUF file ({exc})") from None

    # -- low-level readers --
    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise ConvertError(f"{self.path}: truncated GGUF file (wanted {n} bytes at "
                               f"offset {self._pos})")
        view = self._buf[self._pos:self._pos + n]
        self._pos += n
        return view

    def _scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))[0]

    def _string(self) -> str:
        n = self._scalar("<Q")
        return bytes(self._take(n)).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type = self._scalar("<I")
            count = self._scalar("<Q")
            if item_type in _SCALAR_DTYPES:
                dtype = _SCALAR_DTYPES[item_type]
                arr = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype).copy()
                return arr.astype(bool) if item_type == _BOOL else arr
            if item_type == _STRING:
                return self._string_array(count)
            return [self._value(item_type) for _ in range(count)]
        if vtype in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[vtype]
            value = np.frombuffer(self._take(dtype.itemsize), dtype=dtype)[0]
            if vtype == _FLOAT32:  # shortest decimal that round-trips the float32 (1e-05)
                return float(str(value))
            return bool(value) if vtype == _BOOL else value.item()
        raise ConvertError(f"{self.path}: unknown metadata value type {vtype}")

    def _string_array(self, count: int) -> list[str]:
        buf, pos, out = self._map, self._pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        if pos > len(buf):
            raise ConvertError(f"{self.path}: truncated GGUF file (string array)")
        self._pos = pos
        return out

    # -- structure --
    def _parse(self) -> None:
        if bytes(self._take(4)) != GGUF_MAGIC:
            raise ConvertError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise ConvertError(f"{self.path}: unsupported GGUF version {self.version} "
                               "(only 2 and 3)")
        n_tensors = self._scalar("<Q")
        n_kv = self._scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._scalar("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            ne = [self._scalar("<Q") for _ in range(n_dims)]
            type_id = self._scalar("<I")
            offset = self._scalar("<Q")
            infos.append((name, tuple(reversed(ne)), type_id, offset))
        alignment = config_number(self.path, "general.alignment",
                                  self.metadata.get("general.alignment", DEFAULT_ALIGNMENT), integer=True)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ConvertError(f"{self.path}: invalid general.alignment {alignment}")
        self.alignment = alignment
        self.data_offset = (self._pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in infos:
            info = TensorInfo(name, shape, type_id, self.data_offset + offset)
            if type_id in GGML_TYPES:
                block = GGML_TYPES[type_id][1]
                if shape and shape[-1] % block:
                    raise ConvertError(f"{self.path}: tensor {name!r}: row length {shape[-1]} "
                                       f"is not a multiple of the {info.type_name} block {block}")
                if info.offset + info.n_bytes > len(self._buf):
                    raise ConvertError(f"{self.path}: tensor {name!r} runs past the end of the "
                                       "file (truncated?)")
            self.tensors[name] = info

    def raw(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def check_supported(self, name: str) -> None:
        info = self.tensors[name]
        if info.type_id not in DEQUANTIZERS:
            raise ConvertError(f"{self.path}: tensor {name!r} has unsupported type "
                               f"{info.type_name} (supported: {', '.join(SUPPORTED_TYPES)})")

    def tensor(self, name: str) -> np.ndarray:
        """Dequantised float32 array in numpy (PyTorch) dim order."""
        self.check_supported(name)
        info = self.tensors[name]
        return DEQUANTIZERS[info.type_id](self.raw(name)).reshape(info.shape)

    def close(self) -> None:
        try:
            self._buf.release()
            self._map.close()
        except BufferError:  # an array still views the map; it closes when that is freed
            pass


# --- dequantisation (raw bytes -> flat float32) -----------------------------------------------

def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    return raw.reshape(-1, block_bytes)


def _f16(col: np.ndarray) -> np.ndarray:
    """Little-endian float16 from a (n, 2) uint8 view -> (n, 1) float32."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def dequant_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").astype(np.float32)


def dequant_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def dequant_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 34)
    d = _f16(b[:, :2])
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32): low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(-1)


def dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 20)
    d = _f16(b[:, :2])
    m = _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (d * q + m).reshape(-1)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K packed 6-bit scales: (n, 12) bytes -> (n, 8) scales and (n, 8) mins."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def dequant_q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 144)
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    scales, mins = _k_scales_mins(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    # each 32-byte chunk holds two sub-blocks of 32: low nibbles first, then high nibbles
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    sc = (d * scales.astype(np.float32)).reshape(n, 8, 1)
    mn = (dmin * mins.astype(np.float32)).reshape(n, 8, 1)
    return (sc * q - mn).reshape(-1)


def dequant_q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 210)
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 4, 2, 1)
    d = _f16(b[:, 208:210]).reshape(n, 1, 1, 1, 1)
    # per half of 128: four groups of 32, low/high nibbles of ql[0:32], ql[32:64] with 2 bits of qh
    low = np.concatenate([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F,
                          ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=2)        # (n, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # (n, 2, 4, 32)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    q = q.reshape(n, 2, 4, 2, 16)  # scale index within a half: 2 * group + l // 16
    return (d * scales * q).reshape(-1)


DEQUANTIZERS = {0: dequant_f32, 1: dequant_f16, 30: dequant_bf16, 8: dequant_q8_0,
                2: dequant_q4_0, 3: dequant_q4_1, 12: dequant_q4_k, 14: dequant_q6_k}
SUPPORTED_TYPES = tuple(type_name(t) for t in DEQUANTIZERS)


def dequantize(raw: np.ndarray, type_id: int) -> np.ndarray:
    """Flat float32 values of `raw` bytes holding tensor data of GGML type `type_id`."""
    fn = DEQUANTIZERS.get(type_id)
    if fn is None:
        raise ConvertError(f"unsupported GGML type {type_name(type_id)}")
    return fn(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1))


# --- Q/K row permutation ----------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (half-rotation -> interleaved pairs)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk`: interleaved-pair rows back to HF's half-rotation layout."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --- names and config -------------------------------------------------------------------------

_GLOBAL_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
                "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# tensors llama.cpp may carry that lisa-rt does not need (rope_freqs is read into the config)
_IGNORED = {"rope_freqs.weight"}


def map_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def _uniform(path: Path, key: str, value: Any) -> int:
    """An int, or a per-layer array that must hold one value (lisa-rt has uniform layers)."""
    if isinstance(value, (list, np.ndarray)):
        values = set(config_number(path, key, v, integer=True) for v in value)
        if len(values) != 1:
            raise ConvertError(f"{path}: {key} varies across layers ({sorted(values)}); "
                               "lisa-rt needs uniform layers")
        return values.pop()
    return config_number(path, key, value, integer=True)


def _llama3_freq_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         old_ctx: int) -> np.ndarray:
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor,
                            1.0 / ((1 - smooth) / factor + smooth)))
    return out


def _rope_scaling(gf: GGUFFile, arch: str, head_dim: int, theta: float) -> dict | None:
    md, path = gf.metadata, gf.path
    kind = md.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise ConvertError(f"{path}: unsupported rope scaling {kind!r} ({arch}.rope.scaling.type); "
                           "lisa-rt supports llama3-style scaling only")
    # Without a type, llama.cpp reads a scaling factor (or else the older scale_linear) as linear
    # scaling; with type "none" it reads neither.
    factor_key = next((k for k in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear") if k in md), None)
    if kind is None and factor_key and config_number(path, factor_key, md[factor_key]) not in (0.0, 1.0):
        raise ConvertError(f"{path}: {factor_key} = {md[factor_key]} asks for linear rope scaling, which "
                           "lisa-rt does not support (llama3-style scaling only)")
    if "rope_freqs.weight" not in gf.tensors:
        return None
    # llama.cpp stores llama3 scaling as per-frequency factors; recover the parameters by
    # checking them against the published llama 3.x settings (original context 8192, 1, 4).
    factors = gf.tensor("rope_freqs.weight").astype(np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ConvertError(f"{path}: tensor 'rope_freqs.weight' has {factors.shape[0]} values, "
                           f"expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    old_ctx = config_number(path, f"{arch}.rope.scaling.original_context_length",
                            md.get(f"{arch}.rope.scaling.original_context_length", 8192), integer=True)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        want = _llama3_freq_factors(head_dim, theta, factor, low, high, old_ctx)
        if np.allclose(want, factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    raise ConvertError(f"{path}: tensor 'rope_freqs.weight' does not match llama3 rope scaling; "
                       "unsupported rope frequency factors")


def _describe(value: Any) -> str:
    """A metadata value's GGUF type in words, for messages."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"an array of {'/'.join(kinds)}" if kinds else "an empty array"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _string(gf: GGUFFile, key: str, default: Any = None) -> Any:
    """A string metadata value (default where absent); ConvertError for another type."""
    value = gf.metadata.get(key, default)
    if value is not default and not isinstance(value, str):
        raise ConvertError(f"{gf.path}: {key} must be a string, got {_describe(value)}")
    return value


def _strings(gf: GGUFFile, key: str) -> list[str] | None:
    """An array of strings (None where absent); ConvertError for another type."""
    value = gf.metadata.get(key)
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConvertError(f"{gf.path}: {key} must be an array of strings, got {_describe(value)}")
    return value


def _numbers(gf: GGUFFile, key: str, integer: bool) -> np.ndarray | None:
    """An array of numbers (of integers, with `integer`; None where absent); ConvertError for
    another type."""
    value = gf.metadata.get(key)
    if value is None:
        return None
    kinds = "iu" if integer else "iuf"
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in kinds:
        raise ConvertError(f"{gf.path}: {key} must be an array of {'integers' if integer else 'numbers'}, "
                           f"got {_describe(value)}")
    return value


def _flag(gf: GGUFFile, key: str, default: bool) -> bool:
    value = gf.metadata.get(key, default)
    if isinstance(value, (bool, int)):
        return bool(value)
    raise ConvertError(f"{gf.path}: {key} must be a bool, got {_describe(value)}")


def _token_id(gf: GGUFFile, key: str) -> int | None:
    """tokenizer.ggml.{key}_token_id (bos, eos, eot, unknown, padding), where the file has it."""
    full = f"tokenizer.ggml.{key}_token_id"
    value = gf.metadata.get(full)
    return None if value is None else config_number(gf.path, full, value, integer=True)


def read_config(gf: GGUFFile) -> ModelConfig:
    md, path = gf.metadata, gf.path
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: unsupported architecture {arch!r} (only 'llama')")

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            raise ConvertError(f"{path}: metadata key {full!r} is missing")
        return md[full]

    def number(key: str, default: Any = None, integer: bool = False) -> int | float:
        value = need(key) if default is None else md.get(f"{arch}.{key}", default)
        return config_number(path, f"{arch}.{key}", value, integer=integer)

    hidden = number("embedding_length", integer=True)
    heads = _uniform(path, f"{arch}.attention.head_count", need("attention.head_count"))
    kv_heads = _uniform(path, f"{arch}.attention.head_count_kv",
                        md.get(f"{arch}.attention.head_count_kv", heads))
    if heads < 1 or kv_heads < 1:
        raise ConvertError(f"{path}: {arch}.attention.head_count and head_count_kv must be at least 1, "
                           f"got {heads} and {kv_heads}")
    head_dim = number("attention.key_length", hidden // heads, integer=True)
    rotated = number("rope.dimension_count", head_dim, integer=True)
    if rotated != head_dim:
        raise ConvertError(f"{path}: {arch}.rope.dimension_count ({rotated}) is not the head size "
                           f"({head_dim}); lisa-rt rotates whole heads only")
    theta = number("rope.freq_base", 10000.0)
    tokens = _strings(gf, "tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    elif f"{arch}.vocab_size" in md:
        vocab = number("vocab_size", integer=True)
    else:
        vocab = gf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gf.tensors else 0
    if "token_embd.weight" in gf.tensors and gf.tensors["token_embd.weight"].shape[0] != vocab:
        raise ConvertError(f"{path}: tensor 'token_embd.weight' has "
                           f"{gf.tensors['token_embd.weight'].shape[0]} rows but the vocabulary "
                           f"has {vocab} tokens")
    bos, eos, eot = (_token_id(gf, key) for key in ("bos", "eos", "eot"))
    eos_ids = [eos] if eos is not None else []
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    # a ChatML template ends each answer with <|im_end|>: generation must stop there too
    if tokens is not None and "<|im_end|>" in _string(gf, "tokenizer.chat_template", ""):
        try:
            im_end = tokens.index("<|im_end|>")
        except ValueError:
            im_end = None
        if im_end is not None and im_end not in eos_ids:
            eos_ids.append(im_end)
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=_uniform(path, f"{arch}.feed_forward_length", need("feed_forward_length")),
        num_layers=number("block_count", integer=True),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon"),  # llama.cpp needs it too: no guess
        rope_theta=theta,
        rope_scaling=_rope_scaling(gf, arch, head_dim, theta),
        max_position_embeddings=number("context_length", 2048, integer=True),
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        torch_dtype="float32",
    )


# --- tokenizer --------------------------------------------------------------------------------

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# Pre-tokenizer regexes by tokenizer.ggml.pre. GPT2_PRE_TOKENIZERS (and a file without the key)
# get GPT-2's byte-level regex, as transformers' GGUF loader gives them; any other value names a
# split lisa-rt does not know, which would give other token ids than the model's: refused.
GPT2_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Llama 3's vocabularies, as llama.cpp reads them: a pre-token the vocabulary holds whole is that
# token, whatever the merges would make of it (Llama 3's tokenizer.json says "ignore_merges"),
# and BOS is added where the file does not say (Llama 3 GGUFs often do not).
LLAMA3_VOCABULARIES = ("llama3", "llama-v3", "llama-bpe", "falcon3")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _post_processor(add_bos: bool, add_eos: bool, bos: str | None, eos: str | None,
                    bos_id: int | None, eos_id: int | None):
    """BOS/EOS added on encode(add_special_tokens=True) exactly when the GGUF asks for them."""
    from tokenizers import processors

    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if add_eos and eos is not None else []
    single = [f"{t}:0" for t in head] + ["$A:0"] + [f"{t}:0" for t in tail]
    pair = single + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail]
    specials = {t: i for t, i in ((bos, bos_id), (eos, eos_id)) if t in head + tail}
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=list(specials.items()))


def _sentencepiece_merges(tokens: list[str], scores: np.ndarray,
                          vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    tokens of the vocabulary, the merged token's score deciding the order (best first)."""
    ranked = []
    for token, index in vocab.items():
        score = float(scores[index])
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(r[3], r[4]) for r in ranked]


def build_tokenizer(gf: GGUFFile) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json rebuilt from the file's tokenizer.* metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    md, path = gf.metadata, gf.path
    kind = _string(gf, "tokenizer.ggml.model")
    tokens = _strings(gf, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ConvertError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / "
                           "tokenizer.ggml.tokens)")
    types = _numbers(gf, "tokenizer.ggml.token_type", integer=True)
    types = [1] * len(tokens) if types is None else [int(t) for t in types]
    if len(types) != len(tokens):
        raise ConvertError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                           f"{len(tokens)} tokens")

    def token_of(key: str) -> tuple[str | None, int | None]:
        tid = _token_id(gf, key)
        if tid is None or not 0 <= tid < len(tokens):
            return None, None
        return tokens[tid], tid

    def bpe(**kwargs) -> Tokenizer:
        try:
            return Tokenizer(models.BPE(**kwargs))
        except Exception as exc:  # noqa: BLE001 - `tokenizers` says a merge names no token as a bare Exception
            raise ConvertError(f"{path}: the tokenizer in the GGUF metadata is invalid "
                               f"({' '.join(str(exc).split())})") from None

    bos, bos_id = token_of("bos")
    eos, eos_id = token_of("eos")
    unk, _ = token_of("unknown")
    pad, _ = token_of("padding")

    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())

        def spelled(token: str) -> str:
            if set(token) <= alphabet:
                return token
            return "".join(spelling[b] for b in token.encode("utf-8"))

        vocab = {}
        for index, token in enumerate(tokens):
            vocab[spelled(token)] = index
        merges_raw = _strings(gf, "tokenizer.ggml.merges")
        if merges_raw is None:
            raise ConvertError(f"{path}: gpt2 tokenizer without tokenizer.ggml.merges")
        merges = []
        for merge in merges_raw:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ConvertError(f"{path}: malformed merge {merge!r} in tokenizer.ggml.merges")
            merges.append((left, right))
        pre = _string(gf, "tokenizer.ggml.pre")
        if pre is not None and pre not in PRE_TOKENIZER_SPLITS and pre not in GPT2_PRE_TOKENIZERS:
            known = sorted(set(PRE_TOKENIZER_SPLITS) | set(GPT2_PRE_TOKENIZERS))
            raise ConvertError(f"{path}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre; lisa-rt "
                               f"knows {', '.join(known)}): its token ids would not be the model's")
        llama3 = pre in LLAMA3_VOCABULARIES
        tok = bpe(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=llama3)
        split = PRE_TOKENIZER_SPLITS.get(pre)
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        add_bos = _flag(gf, "tokenizer.ggml.add_bos_token", llama3)
        # a control token spelled outside the byte alphabet cannot be a real token: skip it
        control = [t for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        scores = _numbers(gf, "tokenizer.ggml.scores", integer=False)
        if scores is None:
            raise ConvertError(f"{path}: SentencePiece tokenizer without tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise ConvertError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for "
                               f"{len(tokens)} tokens")
        scores = np.asarray(scores, dtype=np.float64)
        vocab = {}
        for index, token in enumerate(tokens):
            vocab.setdefault(token, index)
        merges = _sentencepiece_merges(tokens, scores, vocab)
        tok = bpe(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        prefix = _flag(gf, "tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        add_bos = _flag(gf, "tokenizer.ggml.add_bos_token", True)
        control = [t for t, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, 2)]
    else:
        raise ConvertError(f"{path}: unsupported tokenizer model {kind!r} "
                           "(tokenizer.ggml.model; supported: gpt2, llama)")

    add_eos = _flag(gf, "tokenizer.ggml.add_eos_token", False)
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    tok.post_processor = _post_processor(add_bos, add_eos, bos, eos, bos_id, eos_id)

    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if unk is not None:
        config["unk_token"] = unk
    if pad is not None:
        config["pad_token"] = pad
    template = _string(gf, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = int(md.get(f"{md.get('general.architecture')}.context_length",
                                            2048))
    return {"tokenizer.json": tok.to_str().encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            .encode("utf-8")}


# --- the source -------------------------------------------------------------------------------

def read_source(src: Path, dtype: str | None, progress: bool) -> SourceModel:
    from tqdm import tqdm

    gf = GGUFFile(src)
    try:
        config = read_config(gf)
        config.torch_dtype = dtype or "float32"
        try:
            config.validate()  # before the head counts shape the tensors
        except ConfigError as exc:
            raise ConvertError(f"{src}: {exc}") from None
        target = torch_dtype_of(config.torch_dtype)
        tokenizer_files = build_tokenizer(gf)  # before minutes of dequantising
        unknown = [n for n in gf.tensors if map_name(n) is None and n not in _IGNORED]
        if unknown:
            raise ConvertError(f"{src}: unexpected tensor {unknown[0]!r} (not a llama tensor)")
        tensors: dict[str, torch.Tensor] = {}
        names = [n for n in gf.tensors if n not in _IGNORED]
        for name in names:  # fail before the progress bar starts, not halfway through it
            gf.check_supported(name)
        for name in tqdm(names, desc="convert", unit="tensor", disable=not progress):
            array = gf.tensor(name)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                n_heads = config.num_heads if "attn_q" in name else config.num_kv_heads
                if array.ndim != 2 or array.shape[0] % (2 * n_heads):
                    raise ConvertError(f"{src}: tensor {name!r} has shape {array.shape}, "
                                       f"not {n_heads} heads of even size")
                array = unpermute_qk(array, n_heads)
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            tensors[map_name(name)] = tensor.to(target) if target != torch.float32 else tensor
    finally:
        gf.close()
    return SourceModel(config, tensors, tokenizer_files)
