"""lisa_rt.tokenizer against transformers on two tiny tokenizers trained by tests/fixtures.py."""
from __future__ import annotations

import json
import random
import re
import shutil
import time

import pytest

from lisa_rt.errors import UserError
from lisa_rt.tokenizer import _BYTE_OF_CHAR, TokenizerError, load_tokenizer
from tests.fixtures import CORPUS, train_bpe_tokenizer, train_sentencepiece_tokenizer

KINDS = ["bpe", "sp"]

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", " leading space", "trailing space ",
    "  two  spaces   and three", "\n\n\t  tabs\tand\nnewlines  \n", "   ", "", "a",
    "def f(x, y=2):\n    return x * y  # comment\n", "for (int i = 0; i < n; ++i) { s += v[i]; }",
    "Café naïve façade ✓ — “quotes” …", "Привет, мир!", "你好，世界！日本語のテキスト", "안녕하세요",
    "Emoji 😀🚀 👍🏽 ❤️ 🇫🇷 🧪 end", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \u200b zero width", "numbers 1234567890 3.14159 0xdeadbeef",
    "<s>literal</s> specials <|im_start|>user\nhi<|im_end|> <unk>", "[INST] question [/INST]",
    "x" * 300, CORPUS[:2000],
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there 😀, what is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <b>bold</b> 你好?"},
]


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    (train_bpe_tokenizer if request.param == "bpe" else train_sentencepiece_tokenizer)(d)
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- basics ----------------------------------------------------------------------------------

def test_attributes(tok, model_dir):
    if (model_dir / "tokenizer.json").exists():
        assert tok.kind == "tokenizers" and tok.eos_token_ids == [tok.token_to_id("<|im_end|>")]
    else:
        assert tok.kind == "sentencepiece" and tok.eos_token_ids == [2]
    assert tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.has_chat_template
    assert tok.vocab_size > 256


def test_extra_eos_ids(model_dir, tok):
    t = load_tokenizer(model_dir, extra_eos_ids=[5, tok.eos_token_ids[0], 7])
    assert t.eos_token_ids == [tok.eos_token_ids[0], 5, 7]


def test_encode_adds_bos_once(tok):
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]


# -- parity with transformers ----------------------------------------------------------------

def test_vocab_size_matches(tok, hf):
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token_ids == [hf.eos_token_id]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf, add_special_tokens):
    for text in TEXTS + CORPUS.splitlines()[:150]:
        assert tok.encode(text, add_special_tokens) == \
            hf(text, add_special_tokens=add_special_tokens)["input_ids"], repr(text)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, hf, skip):
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    for _ in range(200):  # arbitrary ids too: byte-fallback fragments, specials mid-text
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_refuses_what_is_not_a_token_id(tok):
    assert tok.decode([tok.vocab_size + 10]) == ""  # past the vocabulary: nothing, as transformers
    for ids in ([-1], ["a"], [1.5], [None], [10**30]):
        with pytest.raises(TokenizerError, match="token ids to decode must be non-negative integers"):
            tok.decode(ids)


def test_round_trip_plain_text(tok):
    for text in ["Hello world", "Emoji 😀🚀 你好", "def f(x):\n    return x\n"]:
        assert tok.decode(tok.encode(text)) == text


def test_post_processor_used_without_config_flags(model_dir, tmp_path):
    """Without add_bos_token in the config, tokenizer.json's post-processor decides (as in HF)."""
    transformers = pytest.importorskip("transformers")
    if not (model_dir / "tokenizer.json").exists():
        pytest.skip("tokenizer.json only")
    d = _copy_dir(model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"], cfg["add_eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in ["hello", "", "<s>x"]:
        assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.encode("hello").count(tok.bos_token_id) == 1


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, add_generation_prompt):
    for msgs in (MESSAGES, MESSAGES[1:2], MESSAGES[1:]):
        text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(msgs, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
        assert tok.encode_chat(msgs, add_generation_prompt=add_generation_prompt) == \
            hf.apply_chat_template(msgs, tokenize=True, return_dict=False,
                                   add_generation_prompt=add_generation_prompt)
        assert tok.encode_chat(msgs).count(tok.bos_token_id) >= 1


# -- chat template semantics -----------------------------------------------------------------

def _with_template(model_dir, tmp_path, template):
    d = _copy_dir(model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if template is None:
        cfg.pop("chat_template", None)
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(d)


def test_chat_template_helpers(model_dir, tmp_path):
    t = _with_template(model_dir, tmp_path, [
        {"name": "tool_use", "template": "nope"},
        {"name": "default", "template": (
            "{% for m in messages %}\n  {{ m | tojson }}\n{% endfor %}"
            "{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('bad year') }}{% endif %}"
            "{{ eos_token }}{% if add_generation_prompt %}GO{% endif %}")},
    ])
    out = t.apply_chat_template([{"role": "user", "content": "<b>&é"}, {"role": "x", "content": None}])
    # trim_blocks/lstrip_blocks, no HTML escaping, non-ASCII kept, None-valued keys dropped.
    assert out == '  {"role": "user", "content": "<b>&é"}\n  {"role": "x"}\n' + t.eos_token + "GO"


def test_chat_template_raise_exception(tok):
    if tok.kind != "sentencepiece":
        pytest.skip("the llama-2 template checks role order")
    with pytest.raises(TokenizerError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_encode_chat_adds_bos_when_template_does_not(model_dir, tmp_path):
    t = _with_template(model_dir, tmp_path, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ids = t.encode_chat([{"role": "user", "content": "hello"}])
    assert ids == [t.bos_token_id] + t.encode("hello", add_special_tokens=False)


def test_encode_chat_adds_no_second_bos_after_leading_whitespace(model_dir, tmp_path):
    t = _with_template(model_dir, tmp_path, "\n{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    if not t.add_bos_token or not t.bos_token:
        pytest.skip("this tokenizer adds no BOS")
    assert t.encode_chat([{"role": "user", "content": "hello"}]).count(t.bos_token_id) == 1


def test_generation_block_renders_its_body(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    t = _with_template(model_dir, tmp_path, (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert t.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False) \
        == "You are terse.Hi there 😀, what is 2+2?[4.]And <b>bold</b> 你好?"


@pytest.mark.parametrize("template, message", [
    # tojson of a field the message lacks: json.dumps raises TypeError on jinja's Undefined
    ("{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}",
     "TypeError: Object of type Undefined is not JSON serializable"),
    ("{{ (messages | length) / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0].content.split(1) }}", "TypeError"),
])
def test_chat_template_failing_while_rendering_is_one_error_line(model_dir, tmp_path, template, message):
    t = _with_template(model_dir, tmp_path, template)
    with pytest.raises(TokenizerError, match="^chat template error: ") as info:
        t.apply_chat_template(MESSAGES)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_chat_template(model_dir, tmp_path):
    t = _with_template(model_dir, tmp_path, None)
    assert not t.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        t.apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="no chat template"):
        t.encode_chat(MESSAGES)


# -- streaming -------------------------------------------------------------------------------

def _stream(tok, ids, prompt_ids=None):
    dec = tok.stream_decoder(prompt_ids=prompt_ids)
    chunks = [dec.push(i) for i in ids]
    chunks.append(dec.flush())
    return chunks


def test_stream_random_ids(tok):
    rng = random.Random(1)
    byte_ids = sorted(tok._byte_ids) or list(range(tok.vocab_size))
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 25))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


def test_stream_real_text_never_emits_replacement(tok):
    for text in TEXTS + ["😀", "🇫🇷👍🏽", "你好" * 10, " ▁ odd ▁▁ marks"]:
        ids = tok.encode(text)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids)
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in c for c in chunks), (text, chunks)


def test_stream_splits_multibyte_characters(tok):
    if not tok._byte_ids:
        pytest.skip("no byte-fallback tokens")
    ids = tok.encode("a 😀 b 你 c", add_special_tokens=False)
    assert any(i in tok._byte_ids for i in ids)  # the emoji really is split into byte tokens
    chunks = _stream(tok, ids)
    assert "".join(chunks) == "a 😀 b 你 c"
    assert "😀" in "".join(c for c in chunks if "😀" in c)  # emitted whole, never half


def test_stream_after_prompt_keeps_leading_space(tok):
    prompt = tok.encode("The cat reads")
    gen = tok.encode(" the weights quickly. 😀 done", add_special_tokens=False)
    out = "".join(_stream(tok, gen, prompt_ids=prompt))
    assert tok.decode(prompt) + out == tok.decode(prompt + gen)
    assert out.startswith(" ")


def test_stream_skips_special_tokens(tok):
    ids = tok.encode("hello") + tok.eos_token_ids
    assert "".join(_stream(tok, ids)) == "hello"


def _byte_token_ids(tok, data: bytes) -> list[int]:
    """The single-byte tokens spelling `data`: byte fallback's <0xNN> pieces, or the byte-level
    alphabet's characters."""
    if tok._byte_ids:
        return [tok.token_to_id(f"<0x{b:02X}>") for b in data]
    spelling = {b: c for c, b in _BYTE_OF_CHAR.items()}
    return [tok.token_to_id(spelling[b]) for b in data]


def _split_into_bytes(tok, ids: list[int]) -> list[int]:
    """ids with every token that holds a non-ASCII character replaced by its single-byte tokens,
    so that token boundaries fall inside characters."""
    out = []
    for i in ids:
        data = tok.token_bytes(i)
        out += [i] if i in tok._added_ids or data.isascii() else _byte_token_ids(tok, data)
    return out


def _stream_oracle(tok, prompt: list[int], gen: list[int], skip: bool) -> str | None:
    """What streaming `gen` after `prompt` must give: decode(prompt + gen) less the prompt's text,
    where a last character the prompt leaves unfinished (its U+FFFD) and gen completes is not
    the prompt's but comes out with gen. None where no text can be right: gen ends inside a
    character that extends the prompt's byte-fallback run, and decoding then turns the whole
    run, the prompt's finished characters too, into U+FFFD."""
    pre, full = tok.decode(prompt, skip), tok.decode(prompt + gen, skip)
    settled = pre if full.startswith(pre) else pre.rstrip("\ufffd")
    return full[len(settled):] if full.startswith(settled) else None


def test_stream_completes_a_character_the_prompt_began(tok):
    emoji = "😀".encode()
    prompt = tok.encode("Hi ") + _byte_token_ids(tok, emoji[:2])
    gen = _byte_token_ids(tok, emoji[2:]) + tok.encode(" there", add_special_tokens=False)
    assert tok.decode(prompt + gen) == "Hi 😀 there"
    chunks = _stream(tok, gen, prompt_ids=prompt)
    assert "".join(chunks) == "😀 there" and "\ufffd" not in "".join(chunks)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_after_a_prompt_cut_anywhere(tok, skip):
    """Brute force: every cut of real text (whole tokens, and split into byte tokens so that cuts
    fall inside characters), the rest generated in random lengths, against decode."""
    rng = random.Random(7)
    texts = ["Hi 😀 there", "a 你好 b é 🇫🇷 c 👍🏽!", "Café “quotes” — 😀😃 end",
             "x <|im_end|> 😀</s>y"]
    for text in texts:
        ids = tok.encode(text)
        for seq in (ids, _split_into_bytes(tok, ids)):
            for cut in range(len(seq)):
                prompt = seq[:cut]
                for whole, gen in ((True, seq[cut:]), (False, seq[cut:cut + rng.randrange(1, 4)])):
                    want = _stream_oracle(tok, prompt, gen, skip)
                    if want is None:
                        assert not whole and tok._byte_ids, (text, prompt, gen)
                        continue
                    dec = tok.stream_decoder(prompt_ids=prompt, skip_special_tokens=skip)
                    out = "".join(dec.push(i) for i in gen) + dec.flush()
                    assert out == want, (text, prompt, gen)


def test_stream_random_ids_after_a_prompt(tok):
    rng = random.Random(5)
    byte_ids = sorted(tok._byte_ids) or list(range(tok.vocab_size))
    for skip in (True, False):
        for _ in range(500):
            pick = lambda n: [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(tok.vocab_size)
                              for _ in range(n)]  # noqa: E731
            prompt, gen = pick(rng.randrange(0, 12)), pick(rng.randrange(1, 12))
            dec = tok.stream_decoder(prompt_ids=prompt, skip_special_tokens=skip)
            out = "".join(dec.push(i) for i in gen) + dec.flush()
            pre, full = tok.decode(prompt, skip), tok.decode(prompt + gen, skip)
            if full.startswith(pre):  # (random bytes may make the prompt's tail read otherwise)
                assert out == full[len(pre):], (prompt, gen)


def test_stream_after_many_special_tokens_keeps_leading_space(tok):
    prompt = tok.encode("Hi") + tok.eos_token_ids * 8
    gen = tok.encode(" there", add_special_tokens=False)
    assert "".join(_stream(tok, gen, prompt_ids=prompt)) == " there" == tok.decode(prompt + gen)[len("Hi"):]


def test_stream_prompt_alone_gives_nothing(tok):
    # a prompt's own unfinished character is the prompt's: nothing comes out until tokens do
    dec = tok.stream_decoder(prompt_ids=tok.encode("Hi ") + _byte_token_ids(tok, "😀".encode()[:2]))
    assert dec.flush() == ""


def test_token_bytes_spell_the_text(tok):
    # A text's tokens' bytes, joined, are the text they decode to (with the special tokens'
    # text, and a SentencePiece word start's space that decoding strips at the beginning).
    for text in TEXTS + ["😀", "🇫🇷👍🏽", "a 😀 b 你 c", " ▁ odd ▁▁ marks"]:
        ids = tok.encode(text, add_special_tokens=False)
        joined = b"".join(tok.token_bytes(i) for i in ids).decode()
        want = tok.decode(ids, skip_special_tokens=False)
        assert joined == want or (tok.kind == "sentencepiece" and joined == " " + want), (text, joined, want)
    # A byte token alone is part of a character; an id past the vocabulary is no bytes.
    if tok._byte_ids:
        parts = [tok.token_bytes(i) for i in tok.encode("😀", add_special_tokens=False) if i in tok._byte_ids]
        assert b"".join(parts) == "😀".encode() and len(parts) == 4
    assert tok.token_bytes(tok.vocab_size + 5) == b""
    assert tok.token_bytes(tok.eos_token_ids[0]) == tok.eos_token.encode()


def test_encode_with_offsets_points_into_the_text(tok):
    for text in TEXTS:
        ids, starts = tok.encode_with_offsets(text)
        assert ids == tok.encode(text) and len(starts) == len(ids)
        assert starts == sorted(starts) and all(0 <= s <= len(text) for s in starts)
        for token_id, start in zip(ids, starts):
            if token_id in tok._added_ids and token_id not in tok.eos_token_ids + [tok.bos_token_id]:
                assert text[start:].startswith(tok.id_to_token(token_id)), (text, token_id)  # a special named in it


# -- loading and errors ----------------------------------------------------------------------

def test_prefers_tokenizer_json(tmp_path):
    train_sentencepiece_tokenizer(tmp_path)
    train_bpe_tokenizer(tmp_path)  # overwrites the config, adds tokenizer.json
    assert load_tokenizer(tmp_path).kind == "tokenizers"


def test_missing_dir(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_dir_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name,content", [
    ("tokenizer.json", b'{"model": '), ("tokenizer.json", b'{"version": "1.0"}'),
    ("tokenizer.model", b"\x00garbage\xff" * 10), ("tokenizer_config.json", b"{not json"),
])
def test_corrupt_files(model_dir, tmp_path, name, content):
    d = _copy_dir(model_dir, tmp_path / "m")
    if name == "tokenizer.model":
        (d / "tokenizer.json").unlink(missing_ok=True)
    elif name == "tokenizer.json" and not (d / name).exists():
        pytest.skip("tokenizer.json case")
    (d / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=name) as info:
        load_tokenizer(d)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"additional_special_tokens": "<|im_start|>"}, "additional_special_tokens must be a list"),
    ({"additional_special_tokens": [5]}, "additional_special_tokens must be a list"),
    ({"added_tokens_decoder": {"x": {"content": "<s>", "special": True}}},
     "added_tokens_decoder key 'x' is not a token id"),
    ({"added_tokens_decoder": {"1": "<s>"}}, "added_tokens_decoder['1'] must be a token object"),
    ({"added_tokens_decoder": []}, "added_tokens_decoder must be an object"),
    ({"bos_token": 5}, "bos_token must be a string or a token object"),
    ({"chat_template": 5}, "chat_template must be a string"),
], ids=lambda v: None if isinstance(v, dict) else v)
def test_malformed_tokenizer_config_is_one_error_line(model_dir, tmp_path, change, message):
    d = _copy_dir(model_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(change)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: " + re.escape(message)) as info:
        load_tokenizer(d)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, content", [
    ("tokenizer_config.json", b"[]"), ("chat_template.jinja", b"\xff\xfe{{ messages }}"),
])
def test_unreadable_tokenizer_side_files(model_dir, tmp_path, name, content):
    d = _copy_dir(model_dir, tmp_path / "m")
    (d / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=re.escape(name)) as info:
        load_tokenizer(d)
    assert "\n" not in str(info.value)


def test_sentencepiece_added_tokens_decoder_puts_each_token_at_its_id(tmp_path):
    """A tokenizer.model beside a config whose added_tokens_decoder adds a plain token and a
    special one after the vocabulary: both at their ids, as transformers places them."""
    transformers = pytest.importorskip("transformers")
    n = train_sentencepiece_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())

    def entry(content, special):
        return {"content": content, "special": special, "normalized": False, "lstrip": False,
                "rstrip": False, "single_word": False}
    cfg["added_tokens_decoder"] = {"0": entry("<unk>", True), "1": entry("<s>", True), "2": entry("</s>", True),
                                   str(n): entry("<pad_x>", False), str(n + 1): entry("<|im_end|>", True)}
    cfg["eos_token"] = "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.vocab_size == len(hf) == n + 2
    assert tok.token_to_id("<pad_x>") == hf.convert_tokens_to_ids("<pad_x>") == n
    assert tok.eos_token_ids == [hf.eos_token_id] == [n + 1]
    assert n not in tok.special_token_ids and n + 1 in tok.special_token_ids
    assert n in tok.encode("x<pad_x>y") and n + 1 in tok.encode("a <|im_end|> b")
    for text in ["a <|im_end|> b", "x<pad_x>y", "Hello <pad_x> world</s> <|im_end|>"]:
        ids = hf(text)["input_ids"]
        assert tok.encode(text) == ids
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_sentencepiece_user_defined_symbols_are_whole_tokens(tmp_path, monkeypatch):
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    train = spm.SentencePieceTrainer.train
    monkeypatch.setattr(spm.SentencePieceTrainer, "train",
                        lambda **kw: train(**kw, user_defined_symbols=["<tool>", "@@"]))
    train_sentencepiece_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tool = tok.token_to_id("<tool>")
    assert tool == sp.piece_to_id("<tool>") and tool not in tok.special_token_ids
    for text in ["a <tool> b", "x@@y", "call <tool>@@ now", "Hello world"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text == sp.decode(ids)
    assert tool in tok.encode("a <tool> b")


# -- the fixtures themselves -----------------------------------------------------------------

@pytest.mark.parametrize("train,files", [
    (train_bpe_tokenizer, ["tokenizer.json", "tokenizer_config.json"]),
    (train_sentencepiece_tokenizer, ["tokenizer.model", "tokenizer_config.json"]),
])
def test_fixtures_fast_and_deterministic(tmp_path, train, files):
    t0 = time.perf_counter()
    n1 = train(tmp_path / "a")
    assert time.perf_counter() - t0 < 5
    n2 = train(tmp_path / "b")
    assert n1 == n2 == load_tokenizer(tmp_path / "a").vocab_size
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
