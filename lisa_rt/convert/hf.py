"""Hugging Face LLaMA directory -> lisa-rt.

Reads config.json (old and transformers-5 spellings: rope_scaling / rope_parameters,
torch_dtype / dtype), the weights (model.safetensors, sharded safetensors with an index, or
pytorch_model*.bin read with torch.load(weights_only=True)), renames the tensors and copies the
tokenizer files, folding special_tokens_map.json and chat_template.jinja into
tokenizer_config.json.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import expected_shapes
from ..config import ModelConfig, SUPPORTED_DTYPES
from . import ConvertError, SourceModel, config_number, torch_dtype_of

_LAYER_RE = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight", "embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight", "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def map_name(name: str) -> str | None:
    """lisa-rt name of an HF LLaMA tensor; "" for tensors to drop; None if unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match:
        rest = match.group(2)
        if rest == "self_attn.rotary_emb.inv_freq":  # a buffer old checkpoints saved
            return ""
        if rest in _LAYER_NAMES:
            return f"layers.{match.group(1)}.{_LAYER_NAMES[rest]}"
    return None


def _rope_scaling(path: Path, hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, lisa-rt's rope_scaling) from transformers 5's rope_parameters or the older
    rope_scaling and rope_theta, read as transformers 5 reads them: rope_scaling unless it is
    empty, else rope_parameters, and the theta in the one read, else at the top level. The two
    naming different kinds of RoPE are refused: transformers 4 read such a file otherwise."""
    params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ConvertError(f"{path}: {key} must be an object, got {value!r}")
    if scaling and params and _rope_kind(scaling) != _rope_kind(params):
        raise ConvertError(f"{path}: rope_scaling ({_rope_kind(scaling)!r}) and rope_parameters "
                           f"({_rope_kind(params)!r}) disagree; keep one of them")
    scaling = scaling or params
    for place in (scaling, hf):
        if place is not None and "rope_theta" in place:
            theta = config_number(path, "rope_theta", place["rope_theta"])
            break
    else:
        theta = 10000.0
    kind = _rope_kind(scaling) if scaling is not None else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConvertError(f"{path}: unsupported rope scaling type {kind!r} "
                           "(lisa-rt supports 'llama3' only)")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ConvertError(f"{path}: llama3 rope scaling lacks {key!r}")
        out[key] = config_number(path, f"rope scaling {key}", scaling[key],
                                 integer=key == "original_max_position_embeddings")
    return theta, out


def _rope_kind(scaling: dict) -> Any:
    return scaling.get("rope_type", scaling.get("type")) or "default"


def _ids(path: Path, key: str, value: Any) -> list[int]:
    if value is None:
        return []
    return [config_number(path, key, v, integer=True) for v in (value if isinstance(value, list) else [value])]


def read_config(src: Path, dtype: str | None) -> ModelConfig:
    path = src / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: invalid JSON ({exc})") from None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ConvertError(f"{path}: {key} is missing or not an integer")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConvertError(f"{path}: attention_bias / mlp_bias are not supported by lisa-rt")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    tied = hf.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConvertError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is None:
        head_dim = hf["hidden_size"] // heads if heads > 0 else 0  # validate() refuses 0 heads
    theta, scaling = _rope_scaling(path, hf)
    eos = _ids(path, "eos_token_id", hf.get("eos_token_id"))
    gen = src / "generation_config.json"
    if gen.is_file():  # chat models often list their end-of-turn ids only here
        try:
            extra = _ids(gen, "eos_token_id", json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError, ConvertError):
            extra = []  # a hint only: the model converts without it
        eos += [i for i in extra if i not in eos]
    source_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if dtype is None:
        dtype = source_dtype if source_dtype in SUPPORTED_DTYPES else "float32"
    bos = hf.get("bos_token_id")
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    kv_heads = hf.get("num_key_value_heads")
    return ModelConfig(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else config_number(path, "num_key_value_heads", kv_heads, True),
        head_dim=config_number(path, "head_dim", head_dim, integer=True),
        vocab_size=hf["vocab_size"],
        rms_norm_eps=config_number(path, "rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=config_number(path, "max_position_embeddings",
                                               hf.get("max_position_embeddings", 2048), integer=True),
        tie_word_embeddings=tied,
        bos_token_id=None if bos is None else config_number(path, "bos_token_id", bos, integer=True),
        eos_token_ids=eos,
        torch_dtype=dtype,
    )


def _weight_files(src: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) in the order to read them: what transformers loads, where a
    directory holds more than one save (a single file before an index and its shards)."""
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / single).is_file():
            return kind, [src / single]
        if (src / index).is_file():
            try:
                weight_map = json.loads((src / index).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ConvertError(f"{src / index}: invalid index ({exc})") from None
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ConvertError(f"{src / missing[0]}: weight shard named in {index} is missing")
            return kind, [src / f for f in files]
    shards = sorted(src.glob("model-*.safetensors"))
    if shards:
        return "safetensors", shards
    raise ConvertError(f"{src}: no weights (model.safetensors, model-*.safetensors + index, "
                       "or pytorch_model*.bin)")


def _iter_tensors(kind: str, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ConvertError(f"{path}: unreadable safetensors file ({exc})") from None
        return
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad or unsafe pickle
        raise ConvertError(f"{path}: cannot load with torch.load(weights_only=True) "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                           ) from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: expected a state dict, got {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConvertError(f"{path}: entry {name!r} is not a tensor")
        yield name, tensor


def read_tensors(src: Path, config: ModelConfig, progress: bool) -> dict[str, torch.Tensor]:
    from tqdm import tqdm

    want = expected_shapes(config)
    target = torch_dtype_of(config.torch_dtype)
    kind, files = _weight_files(src)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    tied_head = None
    bar = tqdm(total=len(want), desc="convert", unit="tensor", disable=not progress)
    try:
        for path in files:
            for name, tensor in _iter_tensors(kind, path):
                new = map_name(name)
                if new is None:
                    raise ConvertError(f"{path}: unexpected tensor {name!r} (not a LLaMA tensor)")
                if new == "":
                    continue
                if new == "lm_head.weight" and config.tie_word_embeddings:
                    tied_head = (path, name, tensor)  # checked against the embeddings below
                    continue
                if new not in want:
                    raise ConvertError(f"{path}: tensor {name!r} does not fit config.json "
                                       f"({config.num_layers} layers)")
                if new in tensors:
                    raise ConvertError(f"{path}: tensor {name!r} appears twice "
                                       f"(also in {origin[new].name})")
                if tuple(tensor.shape) != want[new]:
                    raise ConvertError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                       f"config.json implies {want[new]}")
                if not tensor.is_floating_point():
                    raise ConvertError(f"{path}: tensor {name!r} has non-float dtype {tensor.dtype}")
                tensors[new] = tensor.to(target).contiguous()
                origin[new] = path
                bar.update(1)
    finally:
        bar.close()
    missing = [n for n in want if n not in tensors]
    if missing:
        hf_name = _hf_name(missing[0])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{src}: tensor {hf_name!r} is missing from "
                           f"{', '.join(p.name for p in files)}{more}")
    if tied_head is not None:  # saved beside tied embeddings: harmless only if it is them
        path, name, tensor = tied_head
        if tuple(tensor.shape) != want["embed.weight"] or not torch.equal(tensor.to(target), tensors["embed.weight"]):
            raise ConvertError(f"{path}: tensor {name!r} differs from the embeddings, but config.json "
                               "ties them (tie_word_embeddings); which is meant is unclear")
    return tensors


def _hf_name(name: str) -> str:
    for hf, ours in _GLOBAL_NAMES.items():
        if ours == name and hf.startswith(("model.", "lm_head")):
            return hf
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match:
        for hf, ours in _LAYER_NAMES.items():
            if ours == match.group(2):
                return f"model.layers.{match.group(1)}.{hf}"
    return name


def _token_text(value: Any) -> Any:
    """A special token as a plain string (tokenizer files may store AddedToken dicts)."""
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    return value


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_tokenizer(src: Path) -> dict[str, bytes]:
    from ..tokenizer import TokenizerError, check_tokenizer_config

    files: dict[str, bytes] = {}
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            files[name] = (src / name).read_bytes()
    if not files:  # unlike a GGUF file, the directory need not hold one; lisa-rt cannot run without
        raise ConvertError(f"{src}: no tokenizer.json or tokenizer.model (the model's tokenizer "
                           "is needed to convert it)")
    config: dict[str, Any] = {}
    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json_object(config_path)
    special_path = src / "special_tokens_map.json"
    if special_path.is_file():
        special = _read_json_object(special_path)
        for key in _SPECIAL_KEYS:
            if config.get(key) is None and special.get(key) is not None:
                config[key] = special[key]
    for key in _SPECIAL_KEYS:
        if key in config:
            config[key] = _token_text(config[key])
    template = src / "chat_template.jinja"
    chat_json = src / "chat_template.json"
    if template.is_file():
        try:
            config["chat_template"] = template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConvertError(f"{template}: cannot read ({exc})") from None
    elif "chat_template" not in config and chat_json.is_file():
        try:
            config["chat_template"] = _read_json_object(chat_json)["chat_template"]
        except KeyError:
            raise ConvertError(f"{chat_json}: no chat_template in it") from None
    try:  # what lisa-rt would refuse when loading the model: refused before converting it
        check_tokenizer_config(config, config_path)
    except TokenizerError as exc:
        raise ConvertError(str(exc)) from None
    if config or config_path.is_file():
        files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False)
                                          + "\n").encode("utf-8")
    return files


def read_source(src: Path, dtype: str | None, progress: bool) -> SourceModel:
    config = read_config(src, dtype)
    try:
        config.validate()
    except Exception as exc:  # ConfigError: name the source file
        raise ConvertError(f"{src / 'config.json'}: {exc}") from None
    tokenizer_files = read_tokenizer(src)  # before the weights: a missing tokenizer fails fast
    tensors = read_tensors(src, config, progress)
    return SourceModel(config, tensors, tokenizer_files)
