"""Fitting LiSA adapters to a model: layer selection, initialisation, distillation.

1. Calibration: the data (text or JSONL files, or text the model samples itself) is tokenized
   into sequences of seq_len tokens, shuffled; a tenth (at least one sequence) is held out to
   measure the result. The frozen base model (float32, dense, batched) is the teacher.
2. Head matching: for every layer l >= 1, the Jensen-Shannon divergence between each head's
   attention and every head of layer l-1; a head's match is its closest head of l-1.
3. Initialisation (DESIGN section 3): A one-hot at the matched heads, W2 = b2 = 0, Wk' = 0, so
   the adapter starts as direct sharing with rearranged heads.
4. Layer selection. select="fitted" (the default): every eligible layer is fitted alone (the
   layer-wise fit below, from the teacher's logits of l-1) and scored by the KL of the model's
   next-token distribution with only that layer LiSA, from the teacher's; the lowest scores win.
   This measures what a fitted layer costs the model, which the divergence at step 0 does not
   (a layer whose heads match well may still matter a lot downstream). select="jsd": the
   lowest matched divergence wins, with no fitting (cheaper, worse).
5. Layer-wise phase: each LiSA layer, in order, on the teacher's hidden states of
   LAYERWISE_SEQUENCES whole training sequences, is fitted towards the teacher layer. The loss
   (layerwise_loss) is "attention": the KL of the attention distributions; or "output": the
   squared error of what the attention block adds to the residual stream (softmax(S) V Wo),
   relative to the teacher's, so a logit matters as much as it moves the output. A chained layer
   reads the fitted logits of the LiSA layer before it. Cheap: no pass through the whole model.
6. End-to-end phase: the whole model with every LiSA layer, base weights frozen; loss = KL from
   the teacher's next-token distribution (its top-k, computed once per sequence the first time
   the sequence is drawn) plus attn_weight x the mean KL
   of each LiSA layer's attention from the one its own Q/K would give on the same input (on
   every ATTENTION_ROW_STRIDE-th query row, other rows each step: an unbiased estimate).
   Full layers whose logits no LiSA layer reads run torch's fused attention (no n x n tensors).

A refit (options.init = an adapter) skips 2-4: it goes on from that adapter's layers and
parameters (end to end, and layer-wise first if layerwise_steps > 0), e.g. with more steps,
longer sequences or other data than the first fit had. A refit given layers moves the adapter
onto them: a layer it keeps goes on from its parameters, a layer it drops is gone, a layer new
to it starts as step 3 says (head matching on the calibration text) and is the only one fitted
layer-wise (layerwise_steps, by default 150 as in a first fit). With a rank that is a multiple
of the adapter's, its delta is first widened to that rank without changing what it computes
(lisa.widen_rank).

Everything runs in float32 on one device and is deterministic for a seed (on the same machine
and thread count).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference
from .config import MAX_ALIGN_HIDDEN, QUALITY_NOT_FINITE, LisaConfig, ModelConfig, strict_json
from .errors import UserError
from .eval import perplexity_of
from .lisa import (MAX_RANK, Adapter, LisaLayer, check_widened_rank, default_rank, head_divergence, init_layer,
                   max_rank, rotate, widen_rank)

TEACHER_TOP_K = 64
KL_SEQUENCES = 8  # training sequences the final train_kl is measured on
SELECT_SEQUENCES = 16  # sequences whose teacher states drive head matching and selection
PROBE_SEQUENCES = 4  # sequences that score each fitted layer's cost to the model's output
SELECT_TOKENS = 256  # the prefix of each sequence that head matching and selection look at
LAYERWISE_SEQUENCES = 16  # whole training sequences the layer-wise phase fits on
LAYERWISE_STEPS = 150  # the layer-wise phase's default steps for a layer with no fitted parameters
ATTENTION_ROW_STRIDE = 8  # the end-to-end attention term looks at one query row in this many
SELECTIONS = ("fitted", "jsd")
LAYERWISE_LOSSES = ("attention", "output")
SELF_PROMPTS = ("The", "In", "Once upon a time", "Today", "Scientists", "A", "When", "History",
                "Here is", "The city", "Many people", "It was", "Question:", "Dear", "Why", "How to")


@dataclass
class FitOptions:
    layers: list[int] | None = None      # explicit LiSA layers; otherwise chosen by ratio
    ratio: float = 0.6                   # floor(ratio x num_layers) LiSA layers
    min_layer: int | None = None         # shallowest layer ratio may choose; default 1 (None: not
                                         # given, so that it can be refused beside layers)
    rank: int | None = None              # default: max(8, head_dim / 8); at most head_dim (lisa.max_rank)
    align_hidden: int | None = None      # default: num_heads
    steps: int = 200                     # end-to-end steps
    layerwise_steps: int | None = None   # per layer fitted layer-wise; default 150, 0 for a refit
                                         # that adds no layers
    layerwise_loss: str = "attention"    # see LAYERWISE_LOSSES and step 5 above
    layerwise_lr: float | None = None    # default: 5 x lr
    seq_len: int = 256
    batch_size: int = 2
    lr: float = 2e-3
    attn_weight: float = 0.1
    max_sequences: int = 256             # calibration sequences used at most
    seed: int = 0
    select: str | None = None            # how ratio chooses layers: see SELECTIONS; default "fitted"
    matched_heads: bool = True           # False: A = identity (the same head index), for ablations
    train_aligner: bool = True           # False: A, W1, b1, W2, b2 stay at their initial values
    train_delta: bool = True             # False: Wq', Wk' stay at init (the delta stays zero)
    init: Adapter | None = None          # go on fitting this adapter (its width and rank; its layers
                                         # unless layers are given)
    progress: bool = True

    @property
    def first_layer(self) -> int:
        """The shallowest layer ratio may choose: min_layer, 1 when not given."""
        return 1 if self.min_layer is None else self.min_layer

    @property
    def selection(self) -> str:
        """How ratio chooses layers: select, "fitted" when not given."""
        return "fitted" if self.select is None else self.select

    def validate(self, config: ModelConfig) -> None:
        if self.layers is not None:
            self.check_layers(config)
        if self.layers is None and not 0 < self.ratio < 1:
            raise UserError(f"--ratio must be in (0, 1), got {self.ratio}")
        if not 1 <= self.first_layer < config.num_layers:
            raise UserError(f"--min-layer must be in 1..{config.num_layers - 1}, got {self.first_layer}")
        if self.layers is None and self.init is None:  # now, not after every eligible layer is fitted
            count, eligible = self.layer_count(config), config.num_layers - self.first_layer
            if count > eligible:
                raise UserError(f"--ratio {self.ratio} asks for {count} LiSA layers but only {eligible} "
                                f"layers are eligible (--min-layer {self.first_layer})")
        if self.max_sequences < 2:  # one to hold out, at least one to fit on
            raise UserError(f"--max-sequences must be >= 2, got {self.max_sequences}")
        for name in ("steps", "layerwise_steps"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 8 or self.seq_len > config.max_position_embeddings:
            raise UserError(f"--seq-len must be in 8..{config.max_position_embeddings}, got {self.seq_len}")
        if self.layerwise_loss not in LAYERWISE_LOSSES:
            raise UserError(f"--layerwise-loss must be one of {', '.join(LAYERWISE_LOSSES)}, "
                            f"got {self.layerwise_loss!r}")
        if self.layerwise_lr is not None and not self.layerwise_lr > 0:
            raise UserError(f"--layerwise-lr must be > 0, got {self.layerwise_lr}")
        if self.selection not in SELECTIONS:
            raise UserError(f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.rank is not None and (self.rank < 2 or self.rank % 2):
            raise UserError(f"--rank must be even and >= 2, got {self.rank}")
        if self.rank is not None and self.rank > config.head_dim:
            raise UserError(f"--rank {self.rank} is more than the model's head dim {config.head_dim}: at rank "
                            f"{config.head_dim} the delta can already be the layer's own q.k, and past it a "
                            f"LiSA layer would cache more per key than the full layer it replaces")
        if self.rank is not None and self.rank > max_rank(config.head_dim):
            raise UserError(f"--rank {self.rank} is more than {MAX_RANK}, the widest delta the LiSA kernels take")
        if self.rank is not None and self.init is not None:
            check_widened_rank(self.init.config.rank, self.rank)
        if self.align_hidden is not None and self.align_hidden < 1:
            raise UserError(f"--align-hidden must be >= 1, got {self.align_hidden}")
        if self.align_hidden is not None and self.align_hidden > MAX_ALIGN_HIDDEN:
            raise UserError(f"--align-hidden {self.align_hidden} is more than {MAX_ALIGN_HIDDEN}, the widest "
                            f"head aligner the LiSA kernels take")
        if self.align_hidden is None and self.init is None and config.num_heads > MAX_ALIGN_HIDDEN:
            raise UserError(f"the default --align-hidden, the model's {config.num_heads} heads, is more than "
                            f"{MAX_ALIGN_HIDDEN}, the widest head aligner the LiSA kernels take: give "
                            f"--align-hidden")

    def check_layers(self, config: ModelConfig) -> None:
        """Explicit layers: in range, each once, and with nothing that only ratio uses (min_layer
        and select would be ignored, not obeyed)."""
        seen = set()
        for layer in self.layers:
            if not 1 <= layer < config.num_layers:
                raise UserError(f"--layers must be in 1..{config.num_layers - 1} (layer 0 is never LiSA), "
                                f"got {layer}")
            if layer in seen:
                raise UserError(f"--layers names layer {layer} more than once")
            seen.add(layer)
        given = [flag for flag, value in (("--min-layer", self.min_layer), ("--select", self.select))
                 if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the layers --ratio "
                            f"chooses: not allowed with --layers")

    def layer_count(self, config: ModelConfig) -> int:
        """How many layers ratio makes LiSA: floor(ratio x layers), at least one."""
        return max(1, math.floor(self.ratio * config.num_layers + 1e-9))


@dataclass
class FitResult:
    adapter: Adapter
    selection: list[dict]                # per layer l >= 1: same-index and matched divergence
    losses: dict[str, list[float]] = field(default_factory=dict)
    quality: dict = field(default_factory=dict)


# --- data ---

def read_texts(paths: list[str]) -> list[str]:
    """Texts from .txt files (one text each) and .jsonl files (a string or {"text": ...} per line)."""
    texts = []
    for name in paths:
        path = Path(name)
        first = len(texts)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such data file") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory, not a data file") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise UserError(f"{path}: unreadable ({exc.strerror})") from None
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
                if isinstance(item, dict):
                    item = item.get("text")
                if not isinstance(item, str):
                    raise UserError(f"{path}:{number}: expected a string or an object with a \"text\" string")
                texts.append(item)
        else:
            texts.append(raw)
        if not any(t.strip() for t in texts[first:]):  # this file's texts, empty records or not
            raise UserError(f"{path}: holds no text")
    return texts


def sample_self_texts(model, count: int, tokens: int, seed: int) -> list[str]:
    """Calibration text for users without a corpus: the model's own samples (temperature 1)."""
    from .engine import generate
    from .sampling import SamplingParams

    tok = model.tokenizer
    prompts = [tok.encode(SELF_PROMPTS[i % len(SELF_PROMPTS)]) for i in range(count)]
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.02,
                             seed=seed + i, ignore_eos=True) for i in range(count)]
    return [SELF_PROMPTS[i % len(SELF_PROMPTS)] + c.text for i, c in enumerate(generate(model, prompts, params))]


def fills_sequences(tokenizer, texts: list[str], seq_len: int, limit: int) -> bool:
    """Whether the texts alone fill make_sequences' limit, so that none after them is read."""
    return len(_token_stream(tokenizer, texts, seq_len * limit)[0]) >= seq_len * limit


def _token_stream(tokenizer, texts: list[str], tokens: int) -> tuple[list[int], int]:
    """(the texts' ids concatenated in order, each with the tokenizer's special tokens (BOS
    where it adds one), texts read): no text is read once `tokens` are there."""
    stream: list[int] = []
    used = 0
    for text in texts:
        if len(stream) >= tokens:
            break
        stream.extend(tokenizer.encode(text))
        used += 1
    return stream, used


def make_sequences(tokenizer, texts: list[str], seq_len: int, limit: int) -> tuple[torch.Tensor, int, int]:
    """([N, seq_len] token ids, texts used, texts used whole): the texts concatenated in order
    (_token_stream) and cut, up to limit sequences. The text that fills the limit may be used in
    part; those after it are not read."""
    stream, used = _token_stream(tokenizer, texts, seq_len * limit)
    count = min(len(stream) // seq_len, limit)
    if count < 2:
        raise UserError(f"the calibration data has {len(stream)} tokens; fitting needs at least "
                        f"{2 * seq_len} (two sequences of --seq-len {seq_len})")
    whole = used - 1 if len(stream) > seq_len * limit else used
    return torch.tensor(stream[: count * seq_len]).view(count, seq_len), used, whole


# --- the dense, batched model ---

class DenseModel:
    """The base model in float32 as plain tensors (frozen), run on [B, n] token batches, with
    LiSA layers (LisaLayer modules) where given."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device):
        self.config = config
        self.t = {name: w.to(device=device, dtype=torch.float32) for name, w in tensors.items()}
        self.device = device
        self.cos_sin = reference.rope_cos_sin_cache(config.head_dim, config.max_position_embeddings,
                                                    config.rope_theta, config.rope_scaling).to(device)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self._lisa_cos_sin: dict[int, torch.Tensor] = {}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.t["embed.weight"][ids]

    def normed(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(hidden, self.t[f"layers.{layer}.attn_norm.weight"], self.config.rms_norm_eps)

    def queries_keys(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's RoPE'd q [B, n, h, d] and k [B, n, g, d] from its normed input x."""
        c, p = self.config, f"layers.{layer}.attn."
        batch, n = x.shape[:2]
        q = rotate((x @ self.t[p + "q_proj.weight"].T).view(batch, n, c.num_heads, c.head_dim), self.cos_sin)
        k = rotate((x @ self.t[p + "k_proj.weight"].T).view(batch, n, c.num_kv_heads, c.head_dim), self.cos_sin)
        return q, k

    def values(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return (x @ self.t[f"layers.{layer}.attn.v_proj.weight"].T).view(*x.shape[:2], c.num_kv_heads, c.head_dim)

    def own_logits(self, layer: int, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Layer's own scaled QK^T logits [B, h, n, n] (unmasked) from its normed input x; of the
        query rows `rows` only when given."""
        c = self.config
        q, k = self.queries_keys(layer, x)
        k = k.repeat_interleave(c.num_heads // c.num_kv_heads, dim=2)
        return torch.einsum("bqhd,bkhd->bhqk", q[:, rows] * self.scale, k)  # scaled on the n x d side

    def mix(self, layer: int, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The attention output [B, n, h*d] of the causal probabilities probs [B, h, n, n]."""
        c = self.config
        v = self.values(layer, x).repeat_interleave(c.num_heads // c.num_kv_heads, dim=2)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)

    def fused_attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The attention output [B, n, h*d] of a full layer whose logits nobody reads: torch's
        fused causal attention, which never materialises the n x n logits (forward or backward)."""
        q, k = self.queries_keys(layer, x)
        q, k, v = (t.transpose(1, 2) for t in (q, k, self.values(layer, x)))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return o.transpose(1, 2).flatten(2)

    def finish_layer(self, layer: int, hidden: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """hidden + the attention output o [B, n, h*d] projected + MLP: the next residual stream."""
        c, p = self.config, f"layers.{layer}."
        hidden = hidden + o @ self.t[p + "attn.o_proj.weight"].T
        h = reference.rms_norm(hidden, self.t[p + "mlp_norm.weight"], c.rms_norm_eps)
        gate = h @ self.t[p + "mlp.gate_proj.weight"].T
        up = h @ self.t[p + "mlp.up_proj.weight"].T
        return hidden + (F.silu(gate) * up) @ self.t[p + "mlp.down_proj.weight"].T

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = reference.rms_norm(hidden, self.t["norm.weight"], c.rms_norm_eps)
        w = self.t["embed.weight"] if c.tie_word_embeddings else self.t["lm_head.weight"]
        return x @ w.T

    def forward(self, ids: torch.Tensor, lisa: dict[int, LisaLayer] | None = None, rank: int = 0,
                on_layer=None) -> torch.Tensor:
        """Logits [B, n, vocab]. on_layer(layer, hidden, x, logits) sees every layer's input
        residual, its normed input and its attention logits (pre-mask) as they are computed;
        logits is None for a full layer whose next layer is not LiSA (it runs fused attention)."""
        return self.head(self.run_layers(ids, lisa, rank, on_layer))

    def run_layers(self, ids: torch.Tensor, lisa: dict[int, LisaLayer] | None = None, rank: int = 0,
                   on_layer=None, count: int | None = None) -> torch.Tensor:
        """The residual stream [B, n, hidden] after the first count layers (all by default), with
        on_layer as in forward: what collects hidden states stops here, before the vocabulary
        projection (B x n x vocab floats) that it does not need."""
        c = self.config
        lisa = lisa or {}
        hidden = self.embed(ids)
        logits = None
        for layer in range(c.num_layers if count is None else count):
            x = self.normed(layer, hidden)
            if layer in lisa:
                logits = lisa[layer].scores(logits, x, self.lisa_cos_sin(rank), c.num_kv_heads, rank)
            elif layer + 1 in lisa:
                logits = self.own_logits(layer, x)
            else:
                logits = None
            if on_layer is not None:
                on_layer(layer, hidden, x, logits)
            o = self.fused_attention(layer, x) if logits is None else self.mix(layer, x, causal_probs(logits))
            hidden = self.finish_layer(layer, hidden, o)
        return hidden

    def lisa_cos_sin(self, rank: int) -> torch.Tensor:
        """The RoPE table of rank-r heads (q', k'), made once per rank."""
        if rank not in self._lisa_cos_sin:
            c = self.config
            self._lisa_cos_sin[rank] = reference.rope_cos_sin_cache(
                rank, c.max_position_embeddings, c.rope_theta, c.rope_scaling).to(self.device)
        return self._lisa_cos_sin[rank]


_CAUSAL_BIAS: dict[tuple[int, torch.device], torch.Tensor] = {}


def causal_bias(n: int, device: torch.device) -> torch.Tensor:
    """[n, n]: 0 on and below the diagonal, -inf above. Adding it masks in one pass, where
    masked_fill would copy the logits first."""
    key = (n, device)
    if key not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[key] = torch.full((n, n), float("-inf"), device=device).triu(1)
    return _CAUSAL_BIAS[key]


def causal_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits + causal_bias(logits.shape[-1], logits.device), dim=-1)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate from its initial value down to 0 over steps, along a half cosine."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1))))


def next_token_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position [..., n] from log-probabilities over the vocabulary."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def attention_kl(target_logits: torch.Tensor, logits: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """Mean over rows and heads of KL(softmax(target) || softmax(logits)), both causal, where the
    logits [..., q, n] are the query rows `rows` of n. Per row, KL = sum_j p_j (t_j - l_j) -
    (lse(t) - lse(l)) over the unmasked j: the masked terms vanish with p_j = 0 and t_j - l_j
    stays finite (the logits past the diagonal are finite if meaningless), so no log(0) is formed."""
    bias = causal_bias(logits.shape[-1], logits.device)[rows]
    target = target_logits + bias
    target_lse = torch.logsumexp(target, dim=-1, keepdim=True)
    p = torch.exp(target - target_lse)
    lse = torch.logsumexp(logits + bias, dim=-1)
    return ((p * (target_logits - logits)).sum(-1) - target_lse.squeeze(-1) + lse).mean()


# --- the fitter ---

class Fitter:
    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], sequences: torch.Tensor,
                 options: FitOptions, device: torch.device | str = "cpu"):
        options.validate(config)
        self.config = config
        self.options = options
        self.device = torch.device(device)
        self.dense = DenseModel(config, tensors, self.device)
        # Shuffled before the split so that every source (files, self samples) is in both halves.
        sequences = sequences[torch.randperm(len(sequences), generator=torch.Generator().manual_seed(options.seed))]
        held = max(1, len(sequences) // 10)
        self.train, self.held_out = sequences[:-held].to(self.device), sequences[-held:].to(self.device)
        if options.init is not None:
            options.init.validate(config, "--init adapter")
            self.rank = options.rank or options.init.config.rank
            self.align_hidden = options.init.config.align_hidden
        else:
            self.rank = options.rank or default_rank(config.head_dim)
            self.align_hidden = options.align_hidden or config.num_heads
        self.generator = torch.Generator().manual_seed(options.seed)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", disable=not self.options.progress, leave=False)

    @torch.no_grad()
    def teacher_states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream entering every layer, [layers][B, n, hidden]."""
        states = []
        self.dense.run_layers(ids, on_layer=lambda layer, hidden, x, logits: states.append(hidden))
        return states

    @torch.no_grad()
    def select(self, states: list[torch.Tensor]) -> tuple[list[dict], dict[int, list[int]]]:
        """Divergence table of every layer >= 1 against the one before, and each one's head matching."""
        table, matching = [], {}
        prev = causal_probs(self.own_logits(0, states))
        for layer in range(1, self.config.num_layers):
            probs = causal_probs(self.own_logits(layer, states))
            div = head_divergence(prev, probs)  # [h, h_prev]
            best = div.argmin(dim=1)
            matching[layer] = best.tolist()
            table.append({"layer": layer, "jsd_same_head": float(div.diagonal().mean()),
                          "jsd_matched": float(div.gather(1, best[:, None]).mean()), "matching": best.tolist()})
            prev = probs
        return table, matching

    def new_module(self, layer: int, matching: dict[int, list[int]]) -> LisaLayer:
        """A LiSA layer at its step-0 parameters, with only the trainable ones requiring grad."""
        heads = matching[layer] if self.options.matched_heads else list(range(self.config.num_heads))
        shapes = LisaConfig(layers=[layer], rank=self.rank, align_hidden=self.align_hidden)
        return self.for_training(LisaLayer(init_layer(self.config, shapes, heads, self.generator)))

    def for_training(self, module: LisaLayer) -> LisaLayer:
        """module on the fitting device with only its trainable parameters requiring grad."""
        module = module.to(self.device)
        module.requires_grad_(False)
        for param in self.trainable(module):
            param.requires_grad_(True)
        return module

    def trainable(self, layer: LisaLayer) -> list[torch.nn.Parameter]:
        names = []
        if self.options.train_aligner:
            names += ["align_a", "align_w1", "align_b1", "align_w2", "align_b2"]
        if self.options.train_delta:
            names += ["q_proj", "k_proj"]
        return [getattr(layer, name) for name in names]

    def fit_layer(self, layer: int, module: LisaLayer, x: torch.Tensor, prev_logits, steps: int, bar) -> float:
        """The layer-wise fit (steps steps) of one LiSA layer towards the teacher layer on the
        normed inputs x [N, n, hidden]; prev_logits(rows) gives what layer-1 hands on for those
        rows. The teacher's logits (and output) are made per step from x: cheaper than holding
        N x h x n x n of them. Returns the last loss."""
        o, c, dense = self.options, self.config, self.dense
        params = self.trainable(module)
        if not params:
            return 0.0
        cos_sin = dense.lisa_cos_sin(self.rank)
        optimizer = torch.optim.Adam(params, lr=o.layerwise_lr or o.lr * 5)
        schedule = cosine_schedule(optimizer, steps)
        out_proj = dense.t[f"layers.{layer}.attn.o_proj.weight"]
        last = 0.0
        for _ in range(steps):
            pick = torch.randint(len(x), (o.batch_size,), generator=self.generator)
            rows = x[pick]
            with torch.no_grad():
                own = dense.own_logits(layer, rows)
                if o.layerwise_loss == "output":
                    target = dense.mix(layer, rows, causal_probs(own)) @ out_proj.T
            logits = module.scores(prev_logits(pick), rows, cos_sin, c.num_kv_heads, self.rank)
            if o.layerwise_loss == "output":
                output = dense.mix(layer, rows, causal_probs(logits)) @ out_proj.T
                loss = (output - target).square().mean() / target.square().mean()
            else:
                loss = attention_kl(own, logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            last = loss.item()
            bar.update(1)
            bar.set_postfix(layer=layer, loss=f"{last:.4f}")
        return last

    @torch.no_grad()
    def own_logits(self, layer: int, states: list[torch.Tensor]) -> torch.Tensor:
        return self.dense.own_logits(layer, self.dense.normed(layer, states[layer]))

    def score_layers(self, table: list[dict], matching: dict[int, list[int]],
                     states: list[torch.Tensor]) -> dict[int, LisaLayer]:
        """Fits every eligible layer alone and records in its table row "fitted_kl": the mean KL
        (nats per token) of the next-token distribution with only that layer LiSA, from the
        teacher's, on probe sequences. Returns the fitted layers (the layer-wise phase goes on
        from them)."""
        o, dense = self.options, self.dense
        probe = self.train[-PROBE_SEQUENCES:, :SELECT_TOKENS]
        with torch.no_grad():
            teacher = torch.log_softmax(dense.forward(probe), dim=-1)
        rows = [row for row in table if row["layer"] >= o.first_layer]
        fitted = {}
        steps = self.layerwise_steps(new_layers=True)
        bar = self._bar(steps * len(rows), "fit: scoring layers")
        for row in rows:
            layer = row["layer"]
            module = self.new_module(layer, matching)
            prev_x = dense.normed(layer - 1, states[layer - 1])
            self.fit_layer(layer, module, dense.normed(layer, states[layer]),
                           lambda pick: dense.own_logits(layer - 1, prev_x[pick]), steps, bar)
            with torch.no_grad():
                student = torch.log_softmax(dense.forward(probe, {layer: module}, self.rank), dim=-1)
                row["fitted_kl"] = float(next_token_kl(teacher, student).mean())
            fitted[layer] = module
        bar.close()
        return fitted

    def layerwise_steps(self, new_layers: bool) -> int:
        """Layer-wise steps per layer: as asked, else LAYERWISE_STEPS for layers without fitted
        parameters and none for a refit that adds no layer."""
        if self.options.layerwise_steps is not None:
            return self.options.layerwise_steps
        return LAYERWISE_STEPS if new_layers else 0

    def selection_states(self) -> list[torch.Tensor]:
        """The teacher's states on a few sequence prefixes: enough to match heads and score layers."""
        return self.teacher_states(self.train[:SELECT_SEQUENCES, :SELECT_TOKENS])

    def choose_layers(self, table: list[dict]) -> list[int]:
        o = self.options
        if o.layers is not None:
            return sorted(o.layers)
        eligible = [row for row in table if row["layer"] >= o.first_layer]
        key = "fitted_kl" if o.selection == "fitted" else "jsd_matched"
        ranked = sorted(eligible, key=lambda row: row[key])
        return sorted(row["layer"] for row in ranked[: o.layer_count(self.config)])

    def fit_layerwise(self, modules: dict[int, LisaLayer], fitted: list[int], steps: int) -> list[float]:
        """Each layer of fitted in order, steps steps, on the teacher's hidden states of whole
        training sequences, towards the teacher layer (options.layerwise_loss). A layer goes on
        from the parameters it has (its selection fit on short prefixes, or a refit's adapter). A
        chained layer reads what the LiSA layer before it hands on. Returns each fitted layer's
        last loss."""
        c, dense = self.config, self.dense
        if steps == 0 or not fitted or not any(self.trainable(m) for m in modules.values()):
            return []
        # Up to the last fitted layer: the layers after it neither change nor feed it.
        layers = [layer for layer in sorted(modules) if layer <= max(fitted)]
        inputs = self.normed_inputs(self.train[:LAYERWISE_SEQUENCES], set(layers) | {l - 1 for l in layers})
        cos_sin = dense.lisa_cos_sin(self.rank)
        losses = []
        bar = self._bar(steps * len(fitted), "fit: layer-wise")
        handed_on = None  # the logits the LiSA layer just fitted hands to the next one, if LiSA
        for layer in layers:
            x, prev_x = inputs[layer], inputs[layer - 1]
            if layer - 1 in modules:
                prev_logits = handed_on.__getitem__
            else:
                prev_logits = lambda pick: dense.own_logits(layer - 1, prev_x[pick])
            if layer in fitted:
                losses.append(self.fit_layer(layer, modules[layer], x, prev_logits, steps, bar))
            handed_on = None
            if layer + 1 in modules:
                with torch.no_grad():  # one sequence at a time: the scores' temporaries stay small
                    handed_on = torch.cat([
                        modules[layer].scores(prev_logits(torch.tensor([i])), x[i : i + 1], cos_sin,
                                              c.num_kv_heads, self.rank) for i in range(len(x))])
        bar.close()
        return losses

    @torch.no_grad()
    def normed_inputs(self, ids: torch.Tensor, layers: set[int]) -> dict[int, torch.Tensor]:
        """The teacher's normed input of each of the given layers, {layer: [B, n, hidden]}."""
        inputs = {}

        def keep(layer, hidden, x, logits):
            if layer in layers:
                inputs[layer] = x

        self.dense.run_layers(ids, on_layer=keep, count=max(layers) + 1)
        return inputs

    @torch.no_grad()
    def teacher_targets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k next-token probabilities of the teacher (renormalised): (indices, probs) [B, n, k]."""
        top = torch.log_softmax(self.dense.forward(ids), dim=-1).topk(TEACHER_TOP_K, dim=-1)
        return top.indices, torch.softmax(top.values, dim=-1)

    def fit_end_to_end(self, modules: dict[int, LisaLayer]) -> list[float]:
        o = self.options
        params = [p for m in modules.values() for p in self.trainable(m)]
        if not params or o.steps == 0:
            return []
        bar = self._bar(o.steps, "fit: end-to-end")
        optimizer = torch.optim.Adam(params, lr=o.lr)
        schedule = cosine_schedule(optimizer, o.steps)
        # The teacher's top-k for a sequence is made the first time it is drawn: a short fit on a
        # large corpus never pays for the sequences it does not draw.
        targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        losses = []
        for step in range(o.steps):
            pick = torch.randint(len(self.train), (o.batch_size,), generator=self.generator).tolist()
            new = sorted(set(i for i in pick if i not in targets))
            if new:
                indices, probs = self.teacher_targets(self.train[new])
                targets.update((i, (indices[n], probs[n])) for n, i in enumerate(new))
            indices = torch.stack([targets[i][0] for i in pick])
            probs = torch.stack([targets[i][1] for i in pick])
            loss, distill = self.end_to_end_loss(modules, self.train[pick], indices, probs, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(distill.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        return losses

    def end_to_end_loss(self, modules: dict[int, LisaLayer], ids: torch.Tensor, indices: torch.Tensor,
                        probs: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One end-to-end step's (loss, distillation part) on ids [B, n], the teacher's top-k
        (indices, probs) [B, n, k] as targets."""
        o = self.options
        attn_terms = []
        # The attention term is estimated on every ATTENTION_ROW_STRIDE-th query row (a
        # different set each step): its n x n work was a third of a step.
        rows = slice(step % ATTENTION_ROW_STRIDE, None, ATTENTION_ROW_STRIDE)

        def on_layer(layer, hidden, x, logits):
            if layer in modules and o.attn_weight > 0:
                with torch.no_grad():
                    own = self.dense.own_logits(layer, x, rows)
                attn_terms.append(attention_kl(own, logits[:, :, rows], rows))

        logits = self.dense.forward(ids, modules, self.rank, on_layer=on_layer)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, indices)
        distill = -(probs * logp).sum(-1).mean()
        return (distill + o.attn_weight * torch.stack(attn_terms).mean() if attn_terms else distill), distill

    @torch.no_grad()
    def compare(self, ids: torch.Tensor, modules: dict[int, LisaLayer]) -> dict[str, float]:
        """Perplexity of the base model and of the LiSA model over ids, and the mean KL(base ||
        LiSA) of their next-token distributions (nats), from one pass of each per batch."""
        base_nll = lisa_nll = kl = 0.0
        for start in range(0, len(ids), self.options.batch_size):
            batch = ids[start : start + self.options.batch_size]
            teacher = torch.log_softmax(self.dense.forward(batch), dim=-1)
            student = torch.log_softmax(self.dense.forward(batch, modules, self.rank), dim=-1)
            kl += float(next_token_kl(teacher, student).double().sum())
            targets = batch[:, 1:, None]
            base_nll -= float(teacher[:, :-1].gather(-1, targets).double().sum())
            lisa_nll -= float(student[:, :-1].gather(-1, targets).double().sum())
        predictions = ids[:, 1:].numel()
        return {"base_ppl": perplexity_of(base_nll / predictions), "lisa_ppl": perplexity_of(lisa_nll / predictions),
                "kl": kl / ids.numel()}

    def run(self) -> FitResult:
        o, c = self.options, self.config
        torch.manual_seed(o.seed)
        started = time.perf_counter()
        if o.init is not None:  # a refit: the adapter's parameters, no selection
            layers = sorted(o.layers) if o.layers is not None else list(o.init.config.layers)
            lisa_config = LisaConfig(layers=layers, rank=self.rank, align_hidden=self.align_hidden)
            lisa_config.validate(c)
            init = o.init if self.rank == o.init.config.rank else widen_rank(o.init, c, self.rank, self.generator)
            added = [layer for layer in layers if layer not in init.config.layers]
            matching = self.select(self.selection_states())[1] if added else {}
            modules = {layer: self.new_module(layer, matching) if layer in added
                       else self.for_training(LisaLayer(init.layer(layer))) for layer in layers}
            table = []
        else:
            states = self.selection_states()
            table, matching = self.select(states)
            fitted = self.score_layers(table, matching, states) if o.layers is None and o.selection == "fitted" else {}
            layers = self.choose_layers(table)
            lisa_config = LisaConfig(layers=layers, rank=self.rank, align_hidden=self.align_hidden)
            lisa_config.validate(c)
            modules = {layer: fitted[layer] if layer in fitted else self.new_module(layer, matching) for layer in layers}
            added = layers
            del fitted, states
        # The layer-wise phase is for layers without fitted parameters: a refit that adds layers
        # fits those alone; one that adds none fits every layer, only if asked to.
        layerwise_layers = added or sorted(modules)
        layerwise_steps = self.layerwise_steps(new_layers=bool(added))
        layerwise = self.fit_layerwise(modules, layerwise_layers, layerwise_steps)
        end_to_end = self.fit_end_to_end(modules)
        held_out = self.compare(self.held_out, modules)
        train = self.compare(self.train[:KL_SEQUENCES], modules)
        tensors = {}
        for layer, module in modules.items():
            tensors.update(module.tensors(layer))
        lisa_config.fit = {"tokens": int(self.train.numel()), "sequences": len(self.train), "seq_len": o.seq_len,
                           "steps": o.steps, "layerwise_steps": layerwise_steps,
                           "layerwise_loss": o.layerwise_loss if layerwise_steps else None,
                           "layerwise_lr": (o.layerwise_lr or o.lr * 5) if layerwise_steps else None,
                           "batch_size": o.batch_size, "lr": o.lr, "attn_weight": o.attn_weight, "seed": o.seed,
                           "min_layer": None if o.layers is not None else o.first_layer,
                           "ratio": None if o.layers is not None else o.ratio,
                           "select": None if o.layers is not None else o.selection,
                           "seconds": round(time.perf_counter() - started, 1)}
        if o.init is not None:  # what it went on from, so the whole chain stays on record
            lisa_config.fit.update(min_layer=None, ratio=None, select=None, init=dict(o.init.config.fit))
            if layers != o.init.config.layers:  # moved onto other layers: which ones, and which were fitted layer-wise
                dropped = [layer for layer in o.init.config.layers if layer not in layers]
                lisa_config.fit.update(added=added, dropped=dropped,
                                       layerwise_layers=layerwise_layers if layerwise_steps else [])
            if self.rank != o.init.config.rank:
                lisa_config.fit["init"]["rank"] = o.init.config.rank
        # Strict JSON: a perplexity past float64's range (a very bad fit) and a ratio of two of
        # them are null, with a "<key>_note" saying why (config.strict_json).
        ratio = held_out["lisa_ppl"] / held_out["base_ppl"]  # base_ppl >= 1; inf / inf is NaN
        quality = strict_json({"held_out_tokens": int(self.held_out[:, 1:].numel()),
                               "base_ppl": round(held_out["base_ppl"], 4), "lisa_ppl": round(held_out["lisa_ppl"], 4),
                               "ppl_ratio": round(ratio, 4), "held_out_kl": round(held_out["kl"], 5),
                               "train_kl": round(train["kl"], 5)}, QUALITY_NOT_FINITE)
        lisa_config.quality = quality
        adapter = Adapter(lisa_config, {name: t.cpu() for name, t in tensors.items()})
        adapter.validate(c)
        return FitResult(adapter, table, {"layerwise": layerwise, "end_to_end": end_to_end}, quality)
