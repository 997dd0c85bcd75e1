"""The LLaMA decoder: embeddings, RMSNorm, RoPE, GQA attention over the paged cache, SwiGLU,
and LiSA layers when an adapter is loaded.

Weights are fused at load time (q|k|v into one projection, gate|up into another) so a layer
runs four matrix products. Everything else goes through the lisa_rt ops, which write into
buffers in place; the same code runs on the CPU and on CUDA.

A LiSA layer (DESIGN section 3) projects x to q' | k' | v (rank-r q' and k', full v), caches
k' and v, and attends with the logits of the layer before it, aligned across heads, plus the
low-rank delta q'.k'. The layer before hands its logits over in a float32 buffer
[tokens, heads, keys]; a chain of LiSA layers ping-pongs two such buffers.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import huge_pages, ops, reference
from .checkpoint import DTYPES, load_config, load_tensors
from .config import ModelConfig
from .errors import UserError
from .kv_cache import BlockTable, KVCache
from .lisa import Adapter, find_adapter
from . import quant
from .quant import QuantizedWeight
from .sampling import upload

MAX_CUDA_HEAD_DIM = 256  # kMaxHeadDim in csrc/cuda/kernels.h
MATRIX_FIELDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # what quantize= quantizes
PREFILL_CHUNK = 512  # tokens per pass when a caller prefills a long sequence by itself


@dataclass
class Batch:
    """One forward pass over a set of sequences: each contributes a chunk of new tokens."""

    input_ids: torch.Tensor      # [T] int64, the chunks packed
    positions: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64, cache slot of each new token
    block_tables: torch.Tensor   # [B, max_blocks] int32
    seq_lens: torch.Tensor       # [B] int32, tokens in cache after this pass
    cu_query_lens: torch.Tensor  # [B + 1] int32, chunk boundaries in the packed tokens
    logits_rows: torch.Tensor    # [R] int64, rows of T whose logits are wanted
    is_decode: bool              # every chunk is one token


def build_batch(chunks: list[tuple[list[int], int, BlockTable]], device: torch.device,
                logit_rows: Sequence[int] | None = None) -> Batch:
    """chunks: (new token ids, position of the first one, the sequence's block table).

    The block tables must already have room for the new tokens. Logits are computed for the
    last logit_rows[i] tokens of chunk i (its last token where logit_rows is None).
    """
    if logit_rows is None:
        logit_rows = [1] * len(chunks)
    ids, positions, slots, lens, cu, rows = [], [], [], [], [0], []
    for (tokens, start, table), wanted in zip(chunks, logit_rows, strict=True):
        ids.extend(tokens)
        positions.extend(range(start, start + len(tokens)))
        slots.extend(table.slots(start, start + len(tokens)))
        lens.append(start + len(tokens))
        cu.append(cu[-1] + len(tokens))
        rows.extend(range(cu[-1] - wanted, cu[-1]))
    width = max(len(table.blocks) for _, _, table in chunks)
    tables = [table.blocks + [0] * (width - len(table.blocks)) for _, _, table in chunks]

    # From pinned memory on CUDA (upload): an overlapped eager step is built while the step
    # before it runs, and a copy from ordinary memory would wait for that step.
    return Batch(
        input_ids=upload(ids, torch.long, device), positions=upload(positions, torch.long, device),
        slot_mapping=upload(slots, torch.long, device), block_tables=upload(tables, torch.int32, device),
        seq_lens=upload(lens, torch.int32, device), cu_query_lens=upload(cu, torch.int32, device),
        logits_rows=upload(rows, torch.long, device), is_decode=all(len(t) == 1 for t, _, _ in chunks))


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv_proj: torch.Tensor      # [q + 2 kv, hidden]; a LiSA layer: [h r + g r + kv, hidden] (q' | k' | v)
    o_proj: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up_proj: torch.Tensor  # [2 * intermediate, hidden]
    down_proj: torch.Tensor
    aligner: tuple[torch.Tensor, ...] | None = None  # LiSA layers: float32 (A, W1, b1, W2, b2)


class Model:
    """A loaded decoder and its tokenizer, on one device in one dtype."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], device: str | torch.device,
                 dtype: torch.dtype, tokenizer=None, path: Path | None = None, adapter: Adapter | None = None,
                 quantize: str | None = None):
        """quantize: None, or "q8_0" / "q4_1" to hold the matrix weights (every layer's and the
        LM head) in that format (quant.py; CPU only); norms, the embedding table and LiSA's
        aligners stay in dtype."""
        self.config = config
        self.device = torch.device(device)
        if quantize is not None:
            if quantize not in quant.FORMATS:
                raise UserError(f"unknown weight format {quantize!r} (choose from {', '.join(quant.FORMATS)})")
            if self.device.type != "cpu":
                raise UserError("quantized weights run on the CPU only (the CUDA kernels take float weights)")
        self.quantize = quantize
        if self.device.type == "cuda" and (config.head_dim % 8 or config.head_dim > MAX_CUDA_HEAD_DIM):
            # The CUDA attention kernels are compiled for these head sizes; refuse others here,
            # with a clear message, rather than at the first kernel launch.
            raise UserError(f"head_dim {config.head_dim} is not supported on CUDA (a multiple of 8, "
                            f"at most {MAX_CUDA_HEAD_DIM})")
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.path = path
        if adapter is not None:
            adapter.validate(config)
        self.adapter = adapter
        self.lisa = adapter.config if adapter is not None else None
        lisa_layers = set(self.lisa.layers) if self.lisa is not None else set()

        def w(name: str) -> torch.Tensor:
            return tensors[name].to(device=self.device, dtype=dtype)

        self.embed = w("embed.weight")
        self.lm_head = self.embed if config.tie_word_embeddings else w("lm_head.weight")
        self.norm = w("norm.weight")
        self.layers = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            aligner = None
            if i in lisa_layers:
                lisa = adapter.layer(i)
                qk = [lisa["q_proj"].to(device=self.device, dtype=dtype),
                      lisa["k_proj"].to(device=self.device, dtype=dtype)]
                aligner = tuple(lisa[name].to(device=self.device, dtype=torch.float32).contiguous()
                                for name in ("align_a", "align_w1", "align_b1", "align_w2", "align_b2"))
            else:
                qk = [w(p + "attn.q_proj.weight"), w(p + "attn.k_proj.weight")]
            self.layers.append(LayerWeights(
                attn_norm=w(p + "attn_norm.weight"),
                qkv_proj=torch.cat([*qk, w(p + "attn.v_proj.weight")]).contiguous(),
                o_proj=w(p + "attn.o_proj.weight"),
                mlp_norm=w(p + "mlp_norm.weight"),
                gate_up_proj=torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]).contiguous(),
                down_proj=w(p + "mlp.down_proj.weight"),
                aligner=aligner))
        if quantize is not None:
            self._quantize_weights(quantize)
        if self.device.type == "cpu":
            self._pack_weights()
        self.cos_sin_cache = reference.rope_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling).to(self.device)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        if self.lisa is not None:
            # q' and k' are rotated like heads of dimension r.
            self.lisa_cos_sin_cache = reference.rope_cos_sin_cache(
                self.lisa.rank, config.max_position_embeddings, config.rope_theta,
                config.rope_scaling).to(self.device)
            self.lisa_scale = 1.0 / math.sqrt(self.lisa.rank)
        self._workspace_rows = 0
        self._buffers: dict[str, torch.Tensor] = {}
        self._scores_size = 0
        self._scores: list[torch.Tensor] = []

    def _quantize_weights(self, format: str) -> None:
        """The matrix weights in `format`, one at a time. A tied LM head gets a quantized copy:
        the embedding table stays float for its look-ups.

        q4_1 keeps the LM head and LiSA layers' q' | k' | v projections in q8_0, as llama.cpp's
        4-bit files keep their output matrix at 6-8 bits: on the default model (held-out licence
        text, float32, the weights alone) 4 bits there cost 5.5% and 0.07% perplexity, and the
        rest in q4_1 costs nothing (its GGUF is Q4_1, whose values q4_1 holds again exactly).
        The kernel's 8-bit input blocks cost 0.4% more (BENCHMARKS.md)."""
        lisa_layers = set(self.lisa.layers) if self.lisa is not None else set()
        wide = "q8_0" if format == "q4_1" else format
        for i, layer in enumerate(self.layers):
            for name in MATRIX_FIELDS:
                chosen = wide if (i in lisa_layers and name == "qkv_proj") else format
                setattr(layer, name, quant.quantize(getattr(layer, name), chosen))
        self.lm_head = quant.quantize(self.lm_head, wide)

    def _pack_weights(self) -> None:
        """The weights a decode step streams, moved into one huge-page arena (huge_pages.py)."""
        fields = ("attn_norm", "mlp_norm") + MATRIX_FIELDS
        tied = self.lm_head is self.embed
        weights = [self.embed, self.norm] + ([] if tied else [self.lm_head]) \
            + [getattr(layer, name) for layer in self.layers for name in fields]
        # A quantized weight is several tensors: packed one by one, then put back together.
        flat = [t for w in weights for t in (w.tensors() if isinstance(w, QuantizedWeight) else [w])]
        packed = iter(huge_pages.pack(flat))
        rebuilt = [w.with_tensors([next(packed) for _ in w.tensors()]) if isinstance(w, QuantizedWeight)
                   else next(packed) for w in weights]
        self.embed, self.norm = rebuilt[0], rebuilt[1]
        self.lm_head = self.embed if tied else rebuilt[2]
        rest = iter(rebuilt[2 if tied else 3:])
        for layer in self.layers:
            for name in fields:
                setattr(layer, name, next(rest))

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, token_counts: list[int]) -> KVCache:
        return KVCache.for_tokens(self.config, token_counts, self.device, self.dtype, lisa=self.lisa)

    def cache_for_budget(self, budget_bytes: int) -> KVCache:
        return KVCache.for_budget(self.config, budget_bytes, self.device, self.dtype, lisa=self.lisa)

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(torch.empty((), dtype=self.dtype).element_size(), self.lisa)

    def workspace(self, tokens: int, max_keys: int = 0) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Activation buffers for `tokens` tokens, reused across passes; with LiSA layers also the
        two float32 logits buffers ("scores") of [tokens, heads, max_keys] that layers hand on.

        Fresh large allocations cost page faults on every pass (and cannot live inside a CUDA
        graph), so the buffers only grow, doubling, when a pass needs more.
        """
        c = self.config
        if self._workspace_rows < tokens:
            rows = max(tokens, 2 * self._workspace_rows)
            widths = {"hidden": c.hidden_size, "residual": c.hidden_size,
                      "qkv": c.q_size + 2 * c.kv_size, "attn": c.q_size,
                      "gate_up": 2 * c.intermediate_size, "act": c.intermediate_size}
            if self.lisa is not None:
                widths["lisa_qkv"] = (c.num_heads + c.num_kv_heads) * self.lisa.rank + c.kv_size
            self._buffers = {name: torch.empty(rows, width, device=self.device, dtype=self.dtype)
                             for name, width in widths.items()}
            self._workspace_rows = rows
        views = {name: buf[:tokens] for name, buf in self._buffers.items()}
        if self.lisa is not None:
            size = tokens * c.num_heads * max_keys
            if self._scores_size < size:
                grown = max(size, 2 * self._scores_size)
                # The size is recorded once the buffers exist: a Ctrl-C between the two (chat goes
                # on after one) would leave a size the buffers do not have.
                self._scores = [torch.empty(grown, device=self.device, dtype=torch.float32) for _ in range(2)]
                self._scores_size = grown
            views["scores"] = [buf[:size].view(tokens, c.num_heads, max_keys) for buf in self._scores]
        return views

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        """Runs the chunks through every layer, filling the cache; float32 logits [R, vocab]."""
        c = self.config
        tokens = batch.input_ids.shape[0]
        # Logits handed to a LiSA layer cover every key the block tables can address.
        ws = self.workspace(tokens, batch.block_tables.shape[1] * cache.block_size)
        hidden, residual, gate_up, act = ws["hidden"], ws["residual"], ws["gate_up"], ws["act"]
        torch.index_select(self.embed, 0, batch.input_ids, out=hidden)
        # The residual stream starts at zero so that every layer, the first included, enters
        # through the same fused add + norm.
        residual.zero_()
        scores = ws.get("scores", [None, None])
        handed_on = 0  # which scores buffer holds the logits the next LiSA layer reads
        for i, layer in enumerate(self.layers):
            ops.fused_add_rms_norm(hidden, residual, layer.attn_norm, c.rms_norm_eps)
            feeds_lisa = i + 1 < len(self.layers) and self.layers[i + 1].aligner is not None
            if layer.aligner is None:
                self._full_attention(i, batch, cache, ws, scores[handed_on] if feeds_lisa else None)
            else:
                self._lisa_attention(i, batch, cache, ws, scores[handed_on],
                                     scores[1 - handed_on] if feeds_lisa else None)
                handed_on = 1 - handed_on if feeds_lisa else handed_on
            ops.linear(hidden, ws["attn"], layer.o_proj)
            ops.fused_add_rms_norm(hidden, residual, layer.mlp_norm, c.rms_norm_eps)
            ops.linear(gate_up, hidden, layer.gate_up_proj)
            ops.silu_and_mul(act, gate_up)
            ops.linear(hidden, act, layer.down_proj)
        ops.fused_add_rms_norm(hidden, residual, self.norm, c.rms_norm_eps)
        rows = hidden[batch.logits_rows]
        logits = torch.empty(rows.shape[0], c.vocab_size, device=self.device, dtype=self.dtype)
        return ops.linear(logits, rows, self.lm_head).float()

    def _full_attention(self, i: int, batch: Batch, cache: KVCache, ws: dict,
                        scores_out: torch.Tensor | None) -> None:
        """Layer i's own attention into ws["attn"]; its logits into scores_out when a LiSA layer follows."""
        c, layer = self.config, self.layers[i]
        tokens, qkv = batch.input_ids.shape[0], ws["qkv"]
        q = qkv[:, : c.q_size].view(tokens, c.num_heads, c.head_dim)
        k = qkv[:, c.q_size : c.q_size + c.kv_size].view(tokens, c.num_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size :].view(tokens, c.num_kv_heads, c.head_dim)
        attn = ws["attn"].view(tokens, c.num_heads, c.head_dim)
        kc, vc = cache.key_pools[i], cache.value_pools[i]
        ops.linear(qkv, ws["hidden"], layer.qkv_proj)
        ops.rotary_cache_write(batch.positions, q, k, v, kc, vc, batch.slot_mapping, self.cos_sin_cache)
        if scores_out is not None:
            ops.paged_attention_scores(attn, scores_out, q, kc, vc, batch.block_tables, batch.cu_query_lens,
                                       batch.seq_lens, self.scale)
        elif batch.is_decode:
            ops.paged_decode_attention(attn, q, kc, vc, batch.block_tables, batch.seq_lens, self.scale)
        else:
            ops.paged_prefill_attention(attn, q, kc, vc, batch.block_tables, batch.cu_query_lens,
                                        batch.seq_lens, self.scale)

    def _lisa_attention(self, i: int, batch: Batch, cache: KVCache, ws: dict, scores_prev: torch.Tensor,
                        scores_out: torch.Tensor | None) -> None:
        """LiSA layer i: q' | k' | v, cache k' and v, attend with the aligned logits of layer i-1."""
        c, layer, r = self.config, self.layers[i], self.lisa.rank
        tokens, lisa_qkv = batch.input_ids.shape[0], ws["lisa_qkv"]
        h_r, g_r = c.num_heads * r, c.num_kv_heads * r
        q_lr = lisa_qkv[:, :h_r].view(tokens, c.num_heads, r)
        k_lr = lisa_qkv[:, h_r : h_r + g_r].view(tokens, c.num_kv_heads, r)
        v = lisa_qkv[:, h_r + g_r :].view(tokens, c.num_kv_heads, c.head_dim)
        attn = ws["attn"].view(tokens, c.num_heads, c.head_dim)
        ops.linear(lisa_qkv, ws["hidden"], layer.qkv_proj)
        ops.rotary_cache_write(batch.positions, q_lr, k_lr, v, cache.key_pools[i], cache.value_pools[i],
                               batch.slot_mapping, self.lisa_cos_sin_cache)
        ops.lisa_attention(attn, scores_out, scores_prev, q_lr, cache.key_pools[i], cache.value_pools[i],
                           batch.block_tables, batch.cu_query_lens, batch.seq_lens, *layer.aligner,
                           self.lisa_scale)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len, vocab] of one prefill over token_ids (for scoring and tools)."""
        if not token_ids:
            raise UserError("logits: token_ids is empty")
        self.check_context(len(token_ids))
        cache = self.new_cache([len(token_ids)])
        table = BlockTable(cache)
        table.ensure(len(token_ids))
        return self.prefill_logits(list(token_ids), cache, table)

    def prefill_logits(self, token_ids: list[int], cache: KVCache, table: BlockTable) -> torch.Tensor:
        """Float32 logits [len, vocab] of every token, prefilled from position 0 (prefill_chunks)."""
        out = list(self.prefill_chunks(token_ids, cache, table))
        return torch.cat(out) if len(out) > 1 else out[0]

    def prefill_chunks(self, token_ids: list[int], cache: KVCache, table: BlockTable) -> Iterator[torch.Tensor]:
        """Float32 logits of every token, prefilled from position 0 in chunks of PREFILL_CHUNK
        tokens (which bounds the logits LiSA layers hand on to chunk x context), one chunk's
        [chunk, vocab] at a time: a caller that scores them as they come never holds them all."""
        for start in range(0, len(token_ids), PREFILL_CHUNK):
            chunk = token_ids[start : start + PREFILL_CHUNK]
            yield self.forward(build_batch([(chunk, start, table)], self.device, [len(chunk)]), cache)

    def check_context(self, num_tokens: int) -> None:
        if num_tokens > self.max_context:
            raise UserError(f"{num_tokens} tokens exceed the model's context of {self.max_context}")


def cpu_runs_bf16_fast() -> bool:
    """Whether lisa-rt's CPU kernels run bfloat16 at speed here: on their AVX2 paths
    (ops.kernel_isa(); ATEN_CPU_CAPABILITY lowers it) they widen bfloat16 weights and caches as
    they load them, or take AVX512-BF16 dot products where the CPU has them, and they route
    bfloat16 GEMMs through float32 where it has not. Elsewhere (the portable loops, or no compiled
    kernels) bfloat16 arithmetic is emulated and slow."""
    return ops.kernel_isa() in ("avx2", "avx512-bf16")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs where it runs fast, float32 on other CPUs. On the CPU
    machines of BENCHMARKS.md bfloat16 decodes 1.3-2x faster than float32 (half the bytes to
    stream) at the same perplexity; float32 stays one `--dtype` away."""
    if device.type == "cuda" or cpu_runs_bf16_fast():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None:
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def parse_device(name: str | torch.device | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r} (cpu or cuda)")
    return device


def load_model_dir(model_dir: str | Path, device=None, dtype=None, lisa=None, quantize: str | None = None) -> Model:
    """Loads a converted lisa-rt model directory.

    lisa: None runs the model's own LiSA adapter if it has one, False the base model, a path
    that adapter file (or the lisa.safetensors in that directory). quantize: None, "q8_0" or
    "q4_1" (Model).
    """
    from .tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    adapter = find_adapter(model_dir, config, lisa)
    tensors = load_tensors(model_dir, config)
    tokenizer = load_tokenizer(model_dir, extra_eos_ids=config.eos_token_ids)
    return Model(config, tensors, device, dtype, tokenizer=tokenizer, path=model_dir, adapter=adapter,
                 quantize=quantize)
