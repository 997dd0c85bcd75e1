"""Read and write a lisa-rt model directory (config.json, safetensors, tokenizer files).

Only safetensors are read here. Loading memory-maps the files and checks every tensor's
name, shape and dtype against config.json; writing goes to a temporary directory that is
renamed into place, so a failed or interrupted write never leaves a half-written model.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .config import ConfigError, ModelConfig
from .errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SHARD_BYTES = 2 * 1024**3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(UserError):
    """A model directory that cannot be loaded; the message names the file and tensor."""


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model directory must hold, with its shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, h), "norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        shapes[p + "attn_norm.weight"] = (h,)
        shapes[p + "attn.q_proj.weight"] = (config.q_size, h)
        shapes[p + "attn.k_proj.weight"] = (config.kv_size, h)
        shapes[p + "attn.v_proj.weight"] = (config.kv_size, h)
        shapes[p + "attn.o_proj.weight"] = (h, config.q_size)
        shapes[p + "mlp_norm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return shapes


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / WEIGHTS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: invalid index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / WEIGHTS_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")
    return [single]


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    if not (model_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{model_dir}: no {CONFIG_FILE} (not a lisa-rt model directory)")
    try:
        return ModelConfig.load(model_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def load_tensors(model_dir: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Memory-map every tensor and validate it against the config."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    want = expected_shapes(config)
    dtype = DTYPES[config.torch_dtype]
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_dir):
        if not path.exists():
            raise CheckpointError(f"{path}: missing weight shard")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name not in want:
                        raise CheckpointError(f"{path}: unexpected tensor {name!r}")
                    tensor = handle.get_tensor(name)
                    if tuple(tensor.shape) != want[name]:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {want[name]}")
                    if tensor.dtype != dtype:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {tensor.dtype}, "
                            f"config.json says {config.torch_dtype}")
                    tensors[name] = tensor
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    missing = [name for name in want if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]!r} is missing{more}")
    return tensors


def tokenizer_kind(model_dir: str | Path) -> str | None:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        return "tokenizers"
    if (model_dir / "tokenizer.model").exists():
        return "sentencepiece"
    return None


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    An existing non-empty `out_dir` is refused unless `force`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"{out_dir}: exists and is not empty (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # mkdtemp makes a private (0700) directory; the model should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """Writes a text file through a temp file beside it and a rename: whole or untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors as model.safetensors, or as shards plus an index when large."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= SHARD_BYTES:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    (directory / WEIGHTS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_model_dir(out_dir: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                   tokenizer_files: dict[str, bytes], force: bool = False) -> Path:
    """Validate and write a complete model directory atomically."""
    config.validate()
    want = expected_shapes(config)
    dtype = DTYPES[config.torch_dtype]
    for name, shape in want.items():
        if name not in tensors:
            raise CheckpointError(f"tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {shape}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r}")
    with atomic_directory(out_dir, force=force) as tmp:
        config.save(tmp / CONFIG_FILE)
        save_tensors(tmp, {name: tensors[name].to(dtype) for name in want})
        for file_name, data in tokenizer_files.items():
            (tmp / file_name).write_bytes(data)
    return Path(out_dir)
