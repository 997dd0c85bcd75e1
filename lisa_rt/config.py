"""Model configuration: the `config.json` of a lisa-rt model directory."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

FORMAT_NAME = "lisa-rt"
FORMAT_VERSION = 1
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# What the LiSA kernels take (csrc/checks.h, check_lisa_args): adapters past these are refused
# when they are fitted or loaded, not when a kernel first runs them.
MAX_RANK = 256          # kMaxLisaRank: the widest low-rank delta (its rank must also be even)
MAX_ALIGN_HIDDEN = 256  # kMaxLisaWidth: the widest head aligner FFN (align_w1 [width, heads])

# Why a number the project writes is not finite, by key: strict JSON has no inf or NaN, so such
# a number is written as null beside "<key>_note" (see finite_or_note).
NOT_FINITE = ("past float64's range", "not a number")
PPL_NOT_FINITE = ("the mean negative log-likelihood is past float64's range",
                  "the model's log-probabilities are NaN")
KL_NOT_FINITE = ("the LiSA model gives probability 0 to a token the base model predicts",
                 "the model's log-probabilities are NaN")
QUALITY_NOT_FINITE = {"base_ppl": PPL_NOT_FINITE, "lisa_ppl": PPL_NOT_FINITE,
                      "ppl_ratio": ("lisa_ppl is inf and base_ppl is not",
                                    "lisa_ppl or base_ppl is NaN, or both are inf"),
                      "held_out_kl": KL_NOT_FINITE, "train_kl": KL_NOT_FINITE}


def finite_or_note(key: str, value: Any, why: tuple[str, str] = NOT_FINITE) -> dict[str, Any]:
    """{key: value} in strict JSON, which has no inf or NaN: a float that is not finite is null,
    with key + "_note" saying which ("inf: ...", "-inf: ..." or "nan: ...") and why: why[0] for
    an infinity, why[1] for NaN."""
    if not isinstance(value, float) or math.isfinite(value):
        return {key: value}
    sign = "" if value > 0 else "-" if value < 0 else None
    note = f"{sign}inf: {why[0]}" if sign is not None else f"nan: {why[1]}"
    return {key: None, f"{key}_note": note}


def strict_json(value: Any, why: dict[str, tuple[str, str]] | None = None) -> Any:
    """value (dicts, lists, numbers, ...) with every float that is not finite replaced, so that
    json.dumps writes strict JSON: in a dict, null and a note beside it (finite_or_note, with
    why[key] where given); in a list, null. Idempotent: a null that has its note keeps it."""
    why = why or {}
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out.update(finite_or_note(key, item, why.get(key, NOT_FINITE)))
            else:
                out[key] = strict_json(item, why)
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(item, float) and not math.isfinite(item) else strict_json(item, why)
                for item in value]
    return value


class ConfigError(UserError):
    """A config.json that is missing, malformed or inconsistent."""


def _positive_finite(name: str, value: Any) -> None:
    """A number every RoPE or norm formula can take: above 0 and finite (inf would make the
    frequencies, and then every logit, inf or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or llama3-style: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"
    lisa: dict | None = None
    arch: str = "llama"

    def validate(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.arch != "llama":
            raise ConfigError(f"unsupported arch {self.arch!r} (only 'llama')")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) is not a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        _positive_finite("rms_norm_eps", self.rms_norm_eps)
        _positive_finite("rope_theta", self.rope_theta)
        if self.torch_dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"torch_dtype must be one of {SUPPORTED_DTYPES}, got {self.torch_dtype!r}")
        if not isinstance(self.tie_word_embeddings, bool):  # "false" would be true
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type")
            if kind != "llama3":
                raise ConfigError(f"unsupported rope_scaling type {kind!r} (only 'llama3')")
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"rope_scaling lacks {key!r}")
                _positive_finite(f"rope_scaling {key}", self.rope_scaling[key])
        if not isinstance(self.eos_token_ids, list):
            raise ConfigError(f"eos_token_ids must be a list of token ids, got {self.eos_token_ids!r}")
        for name, tid in [("eos", t) for t in self.eos_token_ids] + [("bos", self.bos_token_id)]:
            if tid is None and name == "bos":
                continue
            if not _is_int(tid):
                raise ConfigError(f"{name} token id must be an integer, got {tid!r}")
            if not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{name} token id {tid} is outside the vocabulary")
        if self.lisa is not None and not isinstance(self.lisa, dict):
            raise ConfigError(f"lisa must be an object or null, got {type(self.lisa).__name__}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        # The adapter's record as config.json holds it: one written before lisa-rt wrote strict
        # JSON may hold Infinity or NaN (a fit of very bad quality), which is read, never written.
        body["lisa"] = strict_json(body["lisa"], QUALITY_NOT_FINITE)
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if data.get("format") != FORMAT_NAME:
            raise ConfigError(f"not a lisa-rt config (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"unsupported format_version {data.get('format_version')!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in data.items() if k in known}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in body]
        if missing:
            raise ConfigError(f"missing keys: {', '.join(missing)}")
        try:
            config = cls(**body)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def kv_bytes_per_token(self, dtype_bytes: int, lisa: "LisaConfig | None" = None) -> int:
        """Cache bytes per token: K and V of every layer, or k' (rank r) and V where LiSA."""
        full = 2 * self.num_layers * self.kv_size
        if lisa is not None:
            full -= len(lisa.layers) * self.num_kv_heads * (self.head_dim - lisa.rank)
        return full * dtype_bytes

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head


LISA_FORMULATION = "lisa-rt/1"


@dataclass
class LisaConfig:
    """A LiSA adapter's shape and provenance: config.json["lisa"] and the adapter file's metadata.

    layers: the LiSA layers (ascending, none of them 0); rank: r of the low-rank delta per head;
    align_hidden: m, the width of the head aligner's FFN; fit: how it was fitted (data, tokens,
    steps, seed, ...); quality: what the fitter measured (perplexities).
    """

    layers: list[int]
    rank: int
    align_hidden: int
    formulation: str = LISA_FORMULATION
    fit: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)

    def validate(self, model: ModelConfig) -> None:
        """The adapter's shape against the model's, and against what the LiSA kernels take:
        rank even and at most the head dim (lisa.max_rank: past it a LiSA layer would cache
        more per key than the full layer) and MAX_RANK, align_hidden at most MAX_ALIGN_HIDDEN."""
        if self.formulation != LISA_FORMULATION:
            raise ConfigError(f"lisa: unsupported formulation {self.formulation!r} (this lisa-rt "
                              f"implements {LISA_FORMULATION!r})")
        for name in ("rank", "align_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"lisa: {name} must be a positive integer, got {value!r}")
        if self.rank % 2:
            raise ConfigError(f"lisa: rank must be even (RoPE rotates pairs), got {self.rank}")
        if self.rank > model.head_dim:
            raise ConfigError(f"lisa: rank {self.rank} is more than the model's head dim {model.head_dim} "
                              f"(a LiSA layer would cache more per key than the full layer it replaces)")
        if self.rank > MAX_RANK:
            raise ConfigError(f"lisa: rank {self.rank} is more than {MAX_RANK}, the widest delta the LiSA "
                              f"kernels take")
        if self.align_hidden > MAX_ALIGN_HIDDEN:
            raise ConfigError(f"lisa: align_hidden {self.align_hidden} is more than {MAX_ALIGN_HIDDEN}, the "
                              f"widest head aligner the LiSA kernels take")
        if not isinstance(self.layers, list) or not self.layers:
            raise ConfigError("lisa: layers must be a non-empty list")
        for layer in self.layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer < model.num_layers:
                raise ConfigError(f"lisa: layer {layer!r} is not in 1..{model.num_layers - 1} "
                                  f"(layer 0 is never LiSA)")
        if sorted(set(self.layers)) != self.layers:
            raise ConfigError(f"lisa: layers must be ascending and distinct, got {self.layers}")
        for name in ("fit", "quality"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"lisa: {name} must be a JSON object, got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The config as strict JSON: a fit of very bad quality measures an inf or NaN perplexity,
        which is null beside a "<key>_note" (strict_json)."""
        return strict_json(dataclasses.asdict(self), QUALITY_NOT_FINITE)

    @classmethod
    def from_dict(cls, data: Any, model: ModelConfig) -> "LisaConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"lisa: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("layers", "rank", "align_hidden") if name not in data]
        if missing:
            raise ConfigError(f"lisa: missing keys: {', '.join(missing)}")
        body = {k: v for k, v in data.items() if k in known}
        # An adapter written before lisa-rt wrote strict JSON may hold Infinity or NaN in its
        # records (json reads them): kept readable, and held as strict_json writes them.
        for name in ("fit", "quality"):
            if name in body:
                body[name] = strict_json(body[name], QUALITY_NOT_FINITE)
        config = cls(**body)
        config.validate(model)
        return config
