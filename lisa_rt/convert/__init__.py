"""Convert a model from another format into a lisa-rt model directory.

Sources (the registry `SOURCES`, name -> reader):
  "gguf"  a llama.cpp GGUF file (dequantised to float by lisa-rt's own reader)
  "hf"    a Hugging Face LLaMA directory (config.json + safetensors or .bin weights)

A reader returns a `SourceModel` (config, tensors with lisa-rt names, tokenizer files);
`convert` writes it through `checkpoint.save_model_dir`, atomically.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig, SUPPORTED_DTYPES
from ..errors import UserError


class ConvertError(UserError):
    """A conversion source that cannot be read or converted."""


@dataclass
class SourceModel:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer_files: dict[str, bytes]


def config_number(where: Path, key: str, value: object, integer: bool = False) -> int | float:
    """A source config's value (a Python or numpy number) as an int (`integer`) or a float;
    ConvertError naming the file and key for anything else (null, a string, a bool, a fraction
    where an integer belongs)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # (numpy's bool is no Real)
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
        if math.isfinite(number) and (not integer or number.is_integer()):
            return int(value) if integer else number
    shown = " ".join(repr(value).split())  # one line, even for an array
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise ConvertError(f"{where}: {key} must be {'an integer' if integer else 'a number'}, got {shown}")


def torch_dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _read_gguf(src: Path, dtype: str | None, progress: bool) -> SourceModel:
    from .gguf import read_source
    return read_source(src, dtype, progress)


def _read_hf(src: Path, dtype: str | None, progress: bool) -> SourceModel:
    from .hf import read_source
    return read_source(src, dtype, progress)


SOURCES: dict[str, Callable[[Path, str | None, bool], SourceModel]] = {
    "gguf": _read_gguf,
    "hf": _read_hf,
}

HF_LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)

# What a conversion writes, as of this lisa-rt: part of the cache key (source_fingerprint), so a
# model converted by an older converter is converted again. Bump it whenever the written config
# or tokenizer files change for the same source.
# 1: every converter before the version was kept. 2: tokenizer metadata and files checked for
# their types (GGUF tokenizer.*, tokenizer_config.json), chat_template.json in the fingerprint,
# Llama 3 GGUF vocabularies with ignore_merges and BOS by default.
CONVERTER_VERSION = 2


def detect_source(src: str | Path) -> str:
    """The name of the source kind `src` is ("gguf" or "hf"); ConvertError if none fits."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    if src.is_file():
        try:
            with open(src, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise ConvertError(f"{src}: cannot read ({exc.strerror})") from None
        if magic == b"GGUF":
            return "gguf"
        if src.suffix.lower() == ".gguf":
            raise ConvertError(f"{src}: not a GGUF file (bad magic {magic!r})")
        raise ConvertError(f"{src}: not a convertible file (expected a .gguf file or a "
                           "Hugging Face model directory)")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: no config.json (expected a Hugging Face model directory "
                           "or a .gguf file)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{config_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: expected a JSON object")
    if config.get("format") == "lisa-rt":
        raise ConvertError(f"{src}: already a lisa-rt model directory; nothing to convert")
    archs = config.get("architectures") or []
    # transformers builds a model by its model_type: another type with LLaMA's architecture name
    # (Mistral's sliding window, Granite's multipliers) computes something else.
    model_type = config.get("model_type")
    if model_type == "llama" or (model_type is None and any(a in HF_LLAMA_ARCHITECTURES for a in archs)):
        return "hf"
    raise ConvertError(f"{config_path}: unsupported model_type {config.get('model_type')!r} "
                       f"(architectures {archs}); only LLaMA models can be converted")


def _hf_fingerprint_files(src: Path) -> list[Path]:
    # every file hf.read_source reads
    names = ["config.json"]
    for pattern in ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model*.bin.index.json", "tokenizer*", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json"):
        names += sorted(p.name for p in src.glob(pattern))
    return [src / name for name in dict.fromkeys(names)]


def source_fingerprint(src: str | Path) -> str:
    """A short stable hash of the source's identity (path, sizes and mtimes of the files that
    matter) and of CONVERTER_VERSION, for keying a conversion cache. Changes when any of those
    files is rewritten, and when the converter changes what it writes."""
    src = Path(src).resolve()
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    files = [src] if src.is_file() else [p for p in _hf_fingerprint_files(src) if p.is_file()]
    digest = hashlib.sha256(f"converter {CONVERTER_VERSION}\0{src}".encode("utf-8"))
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8"))
    return digest.hexdigest()[:16]


def convert(src: str | Path, out: str | Path, dtype: str | None = None, force: bool = False,
            progress: bool = True) -> Path:
    """Convert `src` (a GGUF file or HF LLaMA directory) into the lisa-rt directory `out`.

    `dtype`: float32 / bfloat16 / float16; None keeps the HF config's torch_dtype (float32 when
    absent) and gives float32 for GGUF. An existing non-empty `out` is refused unless `force`.
    """
    from ..checkpoint import check_writable, save_model_dir

    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}")
    kind = detect_source(src)
    check_writable(out, "output directory", directory=True)  # before minutes of converting
    # Writing OUT replaces the whole directory: one holding the source would delete it. Both the
    # paths as given and as resolved, as a symbolic link on the way may hide either relation.
    outs = {out.resolve(), Path(os.path.abspath(out))}
    srcs = {src.resolve(), Path(os.path.abspath(src))}
    if any(o == s or o in s.parents for o in outs for s in srcs):
        raise ConvertError(f"{out}: the output may not be the source or a directory holding it "
                           "(replacing it would delete the source)")
    if any(s in o.parents for o in outs for s in srcs):
        raise ConvertError(f"{out}: the output may not be the source or lie inside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"{out}: exists and is not empty (use --force to replace it)")
    model = SOURCES[kind](src, dtype, progress)
    return save_model_dir(out, model.config, model.tensors, model.tokenizer_files, force=force)


__all__ = ["CONVERTER_VERSION", "ConvertError", "SourceModel", "SOURCES", "convert", "detect_source",
           "source_fingerprint"]
