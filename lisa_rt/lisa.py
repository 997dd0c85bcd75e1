"""LiSA adapters: the head aligner and low-rank delta of DESIGN section 3, their file format, and
the head matching that initialises them.

A LiSA layer l takes S_prev, the scaled pre-mask logits of layer l-1, and computes

    S = A a + W2 silu(W1 a + b1) + b2  +  q'_i . k'_j / sqrt(r)      (a = S_prev[:, i, j])

with q' = RoPE(x Wq') (h heads of rank r) and k' = RoPE(x Wk') (g heads of rank r), then
softmax(S + mask) V with the layer's own V. The adapter file `lisa.safetensors` holds, per LiSA
layer i, `layers.{i}.lisa.{align_a, align_w1, align_b1, align_w2, align_b2, q_proj, k_proj}`
in float32, and the adapter's LisaConfig as JSON in the safetensors metadata under "lisa", so an
adapter file describes itself wherever it is copied.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ops, reference
from .config import MAX_ALIGN_HIDDEN, MAX_RANK, ConfigError, LisaConfig, ModelConfig  # noqa: F401 (MAX_*: re-exported)
from .errors import UserError

ADAPTER_FILE = "lisa.safetensors"
PARAMS = ("align_a", "align_w1", "align_b1", "align_w2", "align_b2", "q_proj", "k_proj")


class AdapterError(UserError):
    """An adapter file that cannot be used with this model; the message names file and tensor."""


def max_rank(head_dim: int) -> int:
    """The widest delta worth fitting: the head dim d. At rank d (with d's RoPE frequencies) q'.k'
    can already be the layer's own q.k, and a LiSA layer caches as much per key as the full layer
    it replaces; past d it would cache more than that layer, to match what needs no more than d.
    And no wider than the kernels take."""
    return min(head_dim, MAX_RANK)


def default_rank(head_dim: int) -> int:
    """max(8, d/8), rounded up to even (RoPE rotates pairs); at most max_rank (d < 8)."""
    rank = max(8, head_dim // 8)
    return min(rank + rank % 2, max_rank(head_dim))


def param_shapes(model: ModelConfig, lisa: LisaConfig) -> dict[str, tuple[int, ...]]:
    h, g, r, m = model.num_heads, model.num_kv_heads, lisa.rank, lisa.align_hidden
    return {"align_a": (h, h), "align_w1": (m, h), "align_b1": (m,), "align_w2": (h, m),
            "align_b2": (h,), "q_proj": (h * r, model.hidden_size), "k_proj": (g * r, model.hidden_size)}


def tensor_name(layer: int, param: str) -> str:
    return f"layers.{layer}.lisa.{param}"


@dataclass
class Adapter:
    """A LiSA adapter: its config and float32 tensors (full names, see tensor_name)."""

    config: LisaConfig
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """One layer's parameters by short name (align_a, ..., k_proj)."""
        return {param: self.tensors[tensor_name(index, param)] for param in PARAMS}

    def validate(self, model: ModelConfig, where: str = "adapter") -> None:
        self.config.validate(model)
        shapes = param_shapes(model, self.config)
        want = {tensor_name(layer, p): shape for layer in self.config.layers for p, shape in shapes.items()}
        for name, shape in want.items():
            if name not in self.tensors:
                raise AdapterError(f"{where}: tensor {name!r} is missing")
            tensor = self.tensors[name]
            if tuple(tensor.shape) != shape:
                raise AdapterError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                   f"the model and adapter config imply {shape}")
            if tensor.dtype != torch.float32:
                raise AdapterError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected float32")
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{where}: tensor {name!r} holds NaN or infinity")
        extra = sorted(set(self.tensors) - set(want))
        if extra:
            raise AdapterError(f"{where}: unexpected tensor {extra[0]!r}")


def load_adapter(path: str | os.PathLike, model: ModelConfig) -> Adapter:
    """Reads and validates an adapter file (or a directory holding lisa.safetensors)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: no such LiSA adapter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable safetensors file ({exc})") from None
    if "lisa" not in metadata:
        raise AdapterError(f"{path}: not a LiSA adapter (no 'lisa' entry in its metadata)")
    try:
        config = LisaConfig.from_dict(json.loads(metadata["lisa"]), model)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: invalid 'lisa' metadata ({exc})") from None
    except (ConfigError, TypeError) as exc:
        raise AdapterError(f"{path}: {exc}") from None
    adapter = Adapter(config, tensors, path)
    adapter.validate(model, where=str(path))
    return adapter


def save_adapter(path: str | os.PathLike, adapter: Adapter, model: ModelConfig) -> Path:
    """Writes the adapter atomically (temp file, then rename): never a half-written file; a path
    that cannot be written is a UserError."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_file

    adapter.validate(model)
    path = Path(path)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in adapter.tensors.items()}
    # Strict JSON (to_dict writes an inf or NaN perplexity as null with a note; allow_nan=False
    # makes sure of it), before anything is written.
    lisa = json.dumps(adapter.config.to_dict(), allow_nan=False)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lisa": lisa})
    return path


def find_adapter(model_dir: Path | None, model: ModelConfig, lisa=None) -> Adapter | None:
    """The adapter a run uses: lisa=None takes the model's own (config.json["lisa"] set and
    lisa.safetensors beside it), lisa=False none, a path that file or directory."""
    if lisa is False:
        return None
    if lisa is None:
        if model.lisa is None or model_dir is None:
            return None
        return load_adapter(Path(model_dir) / ADAPTER_FILE, model)
    return load_adapter(lisa, model)


def install_adapter(model_dir: str | os.PathLike, adapter: Adapter, model: ModelConfig) -> Path:
    """Makes the adapter the model's own: lisa.safetensors beside it and config.json["lisa"].

    Each file is replaced atomically, the adapter first. Runs read the adapter's settings from
    the file itself (config.json["lisa"] says only that there is one, and keeps its record for
    `info`), so a failure between the two leaves the new adapter in use with the old record, or
    none in use if the model had none before; never a half-written file.
    """
    from .checkpoint import CONFIG_FILE, write_text_atomically

    model_dir = Path(model_dir)
    path = save_adapter(model_dir / ADAPTER_FILE, adapter, model)
    data = json.loads((model_dir / CONFIG_FILE).read_text())
    data["lisa"] = adapter.config.to_dict()  # strict JSON, as in the adapter file
    write_text_atomically(model_dir / CONFIG_FILE, json.dumps(data, indent=2) + "\n")
    return path


# --- head matching and initialisation ---

def xlogx(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * a.clamp_min(1e-30).log(), 0.0)


def head_divergence(prev_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """[h, h_prev] mean JS divergence between head hd of a layer and head e of the layer before.

    prev_probs [..., h_prev, n, n], probs [..., h, n, n]: causal attention distributions, with
    any leading batch dims averaged over. JS(p, q) = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2:
    each head's own entropy term is computed once, so a pair costs one pass over its mixture.
    """
    p = probs.flatten(0, -4) if probs.dim() > 3 else probs[None]
    q = prev_probs.flatten(0, -4) if prev_probs.dim() > 3 else prev_probs[None]
    heads, prev_heads = p.shape[1], q.shape[1]
    p_terms = [xlogx(p[:, hd]).sum(-1, dtype=torch.float64) for hd in range(heads)]
    q_terms = [xlogx(q[:, e]).sum(-1, dtype=torch.float64) for e in range(prev_heads)]
    out = torch.empty(heads, prev_heads, dtype=torch.float64)
    for hd in range(heads):
        for e in range(prev_heads):
            mixture = xlogx(0.5 * (p[:, hd] + q[:, e])).sum(-1, dtype=torch.float64)
            out[hd, e] = (0.5 * (p_terms[hd] + q_terms[e]) - mixture).mean()
    return out


def init_layer(model: ModelConfig, lisa: LisaConfig, matching: list[int],
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Step-0 parameters: A rows one-hot at the matched heads, W2 = b2 = 0, Wk' = 0, so the
    layer starts as direct sharing with rearranged heads. W1 and Wq' are small random values
    (they need to be non-zero for the zero-initialised halves to receive gradients)."""
    shapes = param_shapes(model, lisa)
    h = model.num_heads
    params = {name: torch.zeros(shape) for name, shape in shapes.items()}
    params["align_a"][torch.arange(h), torch.tensor(matching)] = 1.0
    params["align_w1"] = torch.randn(shapes["align_w1"], generator=generator) / math.sqrt(h)
    params["q_proj"] = torch.randn(shapes["q_proj"], generator=generator) / math.sqrt(model.hidden_size)
    return params


def check_widened_rank(old: int, rank: int) -> None:
    """widen_rank's condition, checked before fitting loads anything: a multiple of the old rank."""
    if rank % old:
        raise UserError(f"--rank {rank} with --init: must be a multiple of the adapter's rank {old}")


def widen_rank(adapter: Adapter, model: ModelConfig, rank: int, generator: torch.Generator) -> Adapter:
    """The adapter with its low-rank delta widened to `rank`, a multiple f of its own, giving the
    same logits: RoPE pair i of rank r turns at the frequency of pair f*i of rank f*r, so each old
    dimension moves to the new one of its frequency, and q' grows by sqrt(f) to undo the smaller
    1/sqrt(rank). The new dimensions start as init_layer's do (Wq' small random, Wk' zero), so
    fitting can only add to what the adapter already does."""
    old = adapter.config.rank
    check_widened_rank(old, rank)
    factor, half = rank // old, old // 2
    moved = torch.tensor([i * factor if i < half else rank // 2 + (i - half) * factor for i in range(old)])
    h, g, hidden = model.num_heads, model.num_kv_heads, model.hidden_size
    config = LisaConfig(layers=list(adapter.config.layers), rank=rank, align_hidden=adapter.config.align_hidden,
                        fit=dict(adapter.config.fit), quality=dict(adapter.config.quality))
    tensors = dict(adapter.tensors)
    for layer in config.layers:
        q = torch.randn(h, rank, hidden, generator=generator) / math.sqrt(hidden)
        q[:, moved] = adapter.tensors[tensor_name(layer, "q_proj")].view(h, old, hidden) * math.sqrt(factor)
        k = torch.zeros(g, rank, hidden)
        k[:, moved] = adapter.tensors[tensor_name(layer, "k_proj")].view(g, old, hidden)
        tensors[tensor_name(layer, "q_proj")] = q.view(h * rank, hidden)
        tensors[tensor_name(layer, "k_proj")] = k.view(g * rank, hidden)
    widened = Adapter(config, tensors)
    widened.validate(model)
    return widened


class LisaLayer(torch.nn.Module):
    """One LiSA layer's trainable parameters and its dense (batched, differentiable) logits."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        for name in PARAMS:
            self.register_parameter(name, torch.nn.Parameter(params[name].detach().clone().float()))

    def scores(self, s_prev: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor, num_kv_heads: int,
               rank: int, delta: bool = True) -> torch.Tensor:
        """S [B, h, n, n] from s_prev [B, h, n, n] and the normed hidden x [B, n, hidden]: causal
        logits, meaningful for keys j <= i only (the CPU kernel neither reads nor aligns the rest)."""
        if s_prev.device.type == "cpu" and ops.HAVE_KERNELS:
            aligned = CausalHeadAlign.apply(s_prev, self.align_a, self.align_w1, self.align_b1, self.align_w2,
                                            self.align_b2)
        else:
            aligned = self.aligned(s_prev)
        if not delta:
            return aligned
        batch, n = x.shape[:2]
        # Scaled on the n x r side, and added by the GEMM itself: no extra pass over n x n.
        q = rotate((x @ self.q_proj.T).view(batch, n, -1, rank), cos_sin) / math.sqrt(rank)
        k = rotate((x @ self.k_proj.T).view(batch, n, num_kv_heads, rank), cos_sin)
        k = k.repeat_interleave(q.shape[2] // num_kv_heads, dim=2)
        heads = q.shape[2]
        return torch.baddbmm(aligned.reshape(batch * heads, n, n), q.transpose(1, 2).reshape(batch * heads, n, rank),
                             k.permute(0, 2, 3, 1).reshape(batch * heads, rank, n)).view(batch, heads, n, n)

    def aligned(self, s_prev: torch.Tensor) -> torch.Tensor:
        """The aligner in torch, on every (i, j): for devices without the CPU kernel."""
        # The aligner mixes the head axis: as [B, h, n*n] each map is one batched GEMM over
        # contiguous logits (a permute to [..., h] would copy them, several times over in the
        # backward pass; matmul's broadcasting folds the batch in through transposed copies too).
        a = s_prev.flatten(2)
        batch = a.shape[0]

        def mixed(weight: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(bias[:, None].expand(batch, -1, 1), weight.expand(batch, -1, -1), inputs)

        hidden = torch.nn.functional.silu(mixed(self.align_w1, self.align_b1, a))
        aligned = mixed(self.align_a, self.align_b2, a) + torch.bmm(self.align_w2.expand(batch, -1, -1), hidden)
        return aligned.view(s_prev.shape)

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        return {tensor_name(layer, name): getattr(self, name).detach().clone() for name in PARAMS}


class CausalHeadAlign(torch.autograd.Function):
    """The aligner over causal logits [B, h, n, n] by the CPU kernels (ops.causal_head_align),
    forward and backward: 1.5-3x faster than torch's batched GEMMs at 512-2,048 tokens
    (benchmarks/fit_speed.py), and no n x n temporaries beyond its output and gradient."""

    @staticmethod
    def forward(ctx, s_prev, align_a, align_w1, align_b1, align_w2, align_b2):
        s_prev = s_prev.contiguous()
        out = torch.empty_like(s_prev)
        ops.causal_head_align(out, s_prev, align_a, align_w1, align_b1, align_w2, align_b2)
        ctx.save_for_backward(s_prev, align_a, align_w1, align_b1, align_w2, align_b2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in saved]
        ops.causal_head_align_backward(grads, grad_out.contiguous(), *saved[:5])
        return tuple(grads)


def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """reference.rotary_embedding of x [B, n, heads, dim] at positions 0..n-1 of every sequence."""
    batch, n = x.shape[:2]
    positions = torch.arange(n, device=x.device).repeat(batch)
    return reference.rotary_embedding(positions, x.reshape(batch * n, *x.shape[2:]), cos_sin).view(x.shape)
