"""Test helpers: a small built-in corpus and two tiny tokenizers trained on it.

`train_bpe_tokenizer` writes a byte-level BPE `tokenizer.json` (HF `tokenizers`) with a ChatML
template; `train_sentencepiece_tokenizer` writes a LLaMA-style `tokenizer.model` (SentencePiece
BPE with byte fallback) with a llama-2 template. Both also write `tokenizer_config.json` so that
lisa_rt.tokenizer and transformers load the same files. Both are deterministic and take well
under a second, so tests can train them into a tmp_path instead of shipping binary files.
"""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

__all__ = ["CORPUS", "CHATML_TEMPLATE", "LLAMA2_TEMPLATE", "train_bpe_tokenizer",
           "train_sentencepiece_tokenizer", "tiny_model_dir", "tiny_model_with_adapter", "run_script"]


def _build_corpus() -> str:
    rng = random.Random(20241126)
    subjects = ["The model", "A small cache", "Every layer", "The scheduler", "Our team", "The cat",
                "A tokenizer", "The old library", "This function", "The kernel", "She", "They"]
    verbs = ["reads", "writes", "shares", "computes", "returns", "caches", "ignores", "measures",
             "compresses", "streams", "decodes", "allocates"]
    objects = ["the attention logits", "a block table", "sixteen tokens", "the hidden state",
               "every request", "a quiet river", "the weights", "low-rank deltas", "its own keys",
               "the final answer", "three small apples", "the prompt"]
    tails = ["quickly.", "without a copy.", "in one pass!", "before the next step?",
             "and then it stops.", "as expected.", "(mostly).", "- twice.", "; nothing else.",
             "at 3:45 pm.", "for $12.50.", "100% of the time."]
    lines: list[str] = []
    for _ in range(160):
        lines.append(" ".join([rng.choice(subjects), rng.choice(verbs), rng.choice(objects),
                               rng.choice(tails)]))
    for i in range(40):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        lines.append(f"def f{i}(x, y={b}):\n    return x * {a} + y  # step {i}\n")
        lines.append(f"for (int i = 0; i < {a}; ++i) {{ sum += v[i] * {b}; }}")
        lines.append(f'    if value["key_{i}"] != None:\n\t\tprint(f"{{value}} -> {a}")')
        lines.append(f"<div class=\"row-{i}\">{a}</div>  {{'a': [{a}, {b}]}}")
    unicode_lines = [
        "Café, naïve, façade, über, Ærøskøbing, señor, crème brûlée.",
        "Привет, мир! Как дела?", "Γειά σου κόσμε, αβγδε.", "مرحبا بالعالم",
        "こんにちは世界、日本語のテキストです。", "你好，世界！我们在测试分词器。", "안녕하세요 세계",
        "Emoji: 😀 😃 🚀 🎉 👍🏽 ❤️ 🇫🇷 🧪", "Math: ∑ x² ≤ ∞, α + β = γ, √2 ≈ 1.414",
        "Arrows → ← ↑ ↓ and quotes “like this” or ‘this’ — dash – en dash …",
    ]
    for _ in range(6):
        lines.extend(unicode_lines)
    for i in range(30):
        lines.append(" " * (i % 7) + "indented line " + str(i) + "\t" * (i % 3) + " end")
        lines.append(f"Numbers: {rng.randint(0, 10**9)} and {rng.random():.6f} and 0x{rng.getrandbits(32):08x}")
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


CORPUS: str = _build_corpus()

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The llama-2 chat format: system prompt folded into the first user turn.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def train_bpe_tokenizer(out_dir, vocab_size: int = 1000) -> int:
    """Train a byte-level BPE on CORPUS; write tokenizer.json + tokenizer_config.json.

    Special tokens: <|endoftext|> (0, unk/pad), <s> (1, bos), <|im_start|> (2), <|im_end|> (3,
    eos). The tokenizer.json post-processor also adds <s>, as many hub files do; the config's
    add_bos_token must win over it (BOS appears once). Returns the vocab size.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, min_frequency=2,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False, "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    })
    return tok.get_vocab_size()


def train_sentencepiece_tokenizer(out_dir, vocab_size: int = 600) -> int:
    """Train a LLaMA-style SentencePiece BPE (byte_fallback) on CORPUS; write tokenizer.model +
    tokenizer_config.json (<unk>=0, <s>=1, </s>=2, add_bos_token). Returns the vocab size."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # LLaMA's own settings: identity normalisation, no whitespace squashing, digits split, and
    # rare characters (emoji, most CJK) left to byte fallback so that path gets exercised.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.99,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, max_sentence_length=4096,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "chat_template": LLAMA2_TEMPLATE,
    })
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return sp.get_piece_size()


def tiny_model_dir(directory, seed: int = 0, tokenizer: str = "bpe") -> Path:
    """A converted lisa-rt directory `directory/lisa` of a tiny random LLaMA (3 layers, hidden 96,
    GQA 6/2, context 1024) with a tokenizer trained on CORPUS (BPE: ChatML template, EOS
    <|im_end|>). Needs transformers (test-only); takes about a second."""
    from lisa_rt.convert import convert
    from tests.test_model import build_hf_model

    directory = Path(directory)
    build_hf_model(directory / "hf", heads=6, kv_heads=2, tied=False, rope_scaling=None,
                   tokenizer=tokenizer, seed=seed)
    return convert(directory / "hf", directory / "lisa", progress=False)


def tiny_float32_model(directory, seed: int):
    """tiny_model_dir's model loaded on the CPU in float32: its sums come out the same whatever a
    request is batched with or however its prefill is split (in bfloat16 the rounding of either
    can flip a greedy token), so tests can compare such runs token for token."""
    import lisa_rt

    return lisa_rt.load_model(tiny_model_dir(directory, seed=seed), device="cpu", dtype="float32")


def tiny_model_with_adapter(directory) -> tuple[Path, Path]:
    """tiny_model_dir (seed 3) and a random adapter file on its layers 1 and 2 beside it."""
    from lisa_rt.checkpoint import load_config
    from lisa_rt.lisa import save_adapter
    from tests.test_lisa_model import random_adapter

    model = tiny_model_dir(Path(directory) / "model", seed=3)
    config = load_config(model)
    adapter = Path(directory) / "adapter.safetensors"
    save_adapter(adapter, random_adapter(config, [1, 2]), config)
    return model, adapter


def tiny_model_adapter_and_text(directory) -> tuple[Path, Path, Path]:
    """tiny_model_with_adapter and a text file of CORPUS beside them, for the scripts that score text."""
    model, adapter = tiny_model_with_adapter(directory)
    text = Path(directory) / "text.txt"
    text.write_text(CORPUS, encoding="utf-8")
    return model, adapter, text


def run_script(script: Path, *args) -> subprocess.CompletedProcess:
    """A benchmark script run as users run it, its output captured."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=300)
