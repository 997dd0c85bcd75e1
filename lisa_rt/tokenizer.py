"""One Tokenizer over HF `tokenizers` (tokenizer.json) and SentencePiece (tokenizer.model).

The reference for every behaviour here is what transformers does with the same files, because
that is what models are evaluated against and what users compare with:

- tokenizer.json is run by the `tokenizers` library. When tokenizer_config.json says
  add_bos_token / add_eos_token (or the file has no post-processor), those flags decide the
  special tokens and the file's own post-processor is ignored, so BOS is never doubled.
- tokenizer.model is read with `sentencepiece` and turned into an equivalent `tokenizers` BPE
  (vocab from the pieces, merges from every piece's two-piece splits ranked by the piece's id,
  Metaspace pre-tokenizer, byte fallback), as transformers' LlamaTokenizer does. SentencePiece's
  own encoder splits at whitespace before merging and so disagrees on whitespace runs.
- Chat templates are rendered with jinja2 the way transformers renders them.

`stream_decoder()` gives incremental detokenisation for streaming (prefix/read offsets).
"""
from __future__ import annotations

import codecs
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import UserError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")


class TokenizerError(UserError):
    """Missing or unreadable tokenizer files, or a chat template that cannot be applied."""


def _token_str(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as strings or as serialised AddedTokens.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_config(model_dir: Path) -> dict:
    path = model_dir / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"cannot read {path}: expected a JSON object")
    check_tokenizer_config(config, path)
    return config


def _load_tokenizer_json(path: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on bad JSON or schema
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"cannot read {path}: {first_line}") from None


def _load_sentencepiece(path: Path, config: dict):
    """Build the `tokenizers` BPE that transformers' LlamaTokenizer builds from tokenizer.model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:  # OSError / RuntimeError on a truncated or foreign file
        raise TokenizerError(f"cannot read {path}: not a SentencePiece model ({e})") from None
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    # A merge (l, r) exists for every piece that splits into two pieces; the merged piece's id is
    # its rank (SentencePiece BPE ids follow merge order), shorter left halves first on ties.
    merges = [(p[:k], p[k:]) for p in pieces for k in range(1, len(p))
              if p[:k] in vocab and p[k:] in vocab]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True)
    tok = HFTokenizer(bpe)
    add_prefix_space = config.get("add_prefix_space")
    if add_prefix_space is None:
        add_prefix_space = True
    # legacy=False (LlamaTokenizer's default) puts the dummy-prefix space only before the text's
    # first chunk, not after every special token.
    scheme = "never"
    if add_prefix_space:
        scheme = "always" if config.get("legacy", False) else "first"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # Control symbols (<s>, </s>) and <unk> are special tokens: matched in text, skipped on decode.
    specials = [pieces[i] for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    _add_special(tok, specials, normalized=False)
    # User-defined symbols are matched whole in text, as sentencepiece does, but decoded as text.
    types = _piece_types(sp.serialized_model_proto())
    user = [AddedToken(pieces[i], special=False, normalized=False)
            for i, kind in enumerate(types) if kind == _USER_DEFINED and i < len(pieces)]
    if user:
        tok.add_tokens(user)
    return tok


_USER_DEFINED = 4  # SentencePiece's ModelProto.SentencePiece.Type


def _piece_types(proto: bytes) -> list[int]:
    """The type of each piece of a serialised SentencePiece ModelProto, read from the protobuf
    wire format: sentencepiece's Python API cannot say which pieces are user-defined, and the
    protobuf package is no dependency. Field 1 of the model is the repeated piece, field 3 of a
    piece its type (NORMAL, 1, when absent)."""
    def varint(data: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def fields(data: bytes):
        pos = 0
        while pos < len(data):
            key, pos = varint(data, pos)
            wire = key & 7
            if wire == 0:
                value, pos = varint(data, pos)
            elif wire == 2:
                n, pos = varint(data, pos)
                value, pos = data[pos:pos + n], pos + n
            elif wire in (1, 5):
                n = 8 if wire == 1 else 4
                value, pos = data[pos:pos + n], pos + n
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            yield key >> 3, value

    types = []
    for number, piece in fields(proto):
        if number == 1:
            types.append(next((v for n, v in fields(piece) if n == 3), 1))
    return types


def _add_special(tok, contents: Iterable[str], normalized: bool | None = None) -> None:
    from tokenizers import AddedToken

    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    new = []
    for c in contents:
        if c and c not in known:
            known.add(c)
            kw = {} if normalized is None else {"normalized": normalized}
            new.append(AddedToken(c, special=True, **kw))
    if new:
        tok.add_special_tokens(new)


def load_tokenizer(model_dir, extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
    """Load the tokenizer of `model_dir` (tokenizer.json preferred over tokenizer.model)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {model_dir}")
    config = _read_config(model_dir)
    if (model_dir / TOKENIZER_JSON).is_file():
        kind, tok = "tokenizers", _load_tokenizer_json(model_dir / TOKENIZER_JSON)
    elif (model_dir / SENTENCEPIECE_MODEL).is_file():
        kind, tok = "sentencepiece", _load_sentencepiece(model_dir / SENTENCEPIECE_MODEL, config)
    else:
        raise TokenizerError(f"no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in {model_dir}")
    template = config.get("chat_template")
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():  # newer transformers save the template beside the config
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {jinja_file}: {e}") from None
    _add_config_tokens(tok, config)
    return Tokenizer(tok, kind, config, template, extra_eos_ids)


def check_tokenizer_config(config: dict, path: Path) -> None:
    """A TokenizerError naming `path` unless the tokenizer_config.json fields lisa-rt reads have
    the types transformers takes: special tokens as strings or token objects, a list of
    additional_special_tokens (a string would make each of its characters special), an
    added_tokens_decoder of id -> token object, a chat template string or list of named ones."""
    def is_token(value: Any) -> bool:
        return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))

    for key in _SPECIAL_KEYS:
        if config.get(key) is not None and not is_token(config[key]):
            raise TokenizerError(f"{path}: {key} must be a string or a token object, got {_shown(config[key])}")
    extra = config.get("additional_special_tokens")
    if extra is not None and not (isinstance(extra, list) and all(is_token(t) for t in extra)):
        raise TokenizerError(f"{path}: additional_special_tokens must be a list of tokens, got {_shown(extra)}")
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not isinstance(decoder, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object of token id -> token")
    for key, entry in (decoder or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if token_id < 0:
            raise TokenizerError(f"{path}: added_tokens_decoder key {_shown(key)} is not a token id")
        if not isinstance(entry, dict) or not is_token(entry):
            raise TokenizerError(f"{path}: added_tokens_decoder[{key!r}] must be a token object with a "
                                 "string 'content'")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, list) and all(isinstance(t, dict) for t in template)):
        raise TokenizerError(f"{path}: chat_template must be a string or a list of named templates, "
                             f"got {type(template).__name__}")


def _shown(value: Any) -> str:
    """A JSON value for an error message: one line, not too long."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _add_config_tokens(tok, config: dict) -> None:
    """The tokens tokenizer_config.json adds, as transformers adds them: every entry of
    added_tokens_decoder, in the order of its ids (so each lands at the id it states, where the
    ids follow the vocabulary), with its own flags; then the special tokens the config names."""
    from tokenizers import AddedToken

    decoder = config.get("added_tokens_decoder") or {}
    known = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        special = bool(entry.get("special", False))
        if known.get(entry["content"]) == special:
            continue
        flags = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
        token = AddedToken(entry["content"], special=special, **flags)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        known[entry["content"]] = special
    named = ([_token_str(config.get(k)) for k in _SPECIAL_KEYS]
             + [_token_str(t) for t in config.get("additional_special_tokens") or []])
    _add_special(tok, [t for t in named if t])


def check_unicode(text: str) -> None:
    """A TokenizerError unless text is a str of Unicode characters the tokenizer can take. Python
    turns argv bytes that are not UTF-8 into lone surrogates (U+DC80-U+DCFF), and JSON can spell
    one ("\\ud800"); neither encodes as UTF-8."""
    if not isinstance(text, str):
        raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}")
        raise TokenizerError(f"the text is not valid UTF-8: {what} at character {e.start}") from None


class ChatMessageError(TokenizerError):
    """A chat message that cannot be rendered; `where` names the part ("messages[2].content")
    and `code` is "invalid_value" for text that is not valid Unicode."""

    def __init__(self, where: str, message: str, code: str | None = None):
        super().__init__(message)
        self.where, self.code = where, code


CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles OpenAI's chat API has


def chat_messages(messages: Any, roles: Sequence[str] | None = None) -> list[dict]:
    """Messages as OpenAI's chat API takes them, as chat templates read them: "developer",
    OpenAI's newer name for the system role, becomes "system", and a content given as a list of
    text parts becomes one string. Other keys (tool_calls, name, ...) and a content of None go to
    the template as they are. `roles`, where given, are the only roles allowed. Raises
    ChatMessageError."""
    if not isinstance(messages, list) or not messages:
        raise ChatMessageError("messages", "'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatMessageError(f"messages[{i}]", f"messages[{i}] must be an object with a 'role'")
        role = "system" if message["role"] == "developer" else message["role"]
        if roles is not None and role not in roles:
            raise ChatMessageError(f"messages[{i}].role", f"messages[{i}].role {role!r} is not one of "
                                   f"{', '.join(roles)}" + (", developer" if "system" in roles else ""))
        content = message.get("content")
        if content is not None:
            content = _message_text(content, f"messages[{i}].content")
        out.append({**message, "role": role, "content": content})
    return out


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, list):
        if any(not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str)
               for part in content):
            raise ChatMessageError(where, f"{where}: only text parts are supported")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ChatMessageError(where, f"{where} must be a string or a list of text parts")
    try:
        check_unicode(content)
    except TokenizerError as exc:
        raise ChatMessageError(where, f"{where}: {exc}", code="invalid_value") from None
    return content


class Tokenizer:
    """Encode, decode, chat templates and streaming decode over one `tokenizers.Tokenizer`."""

    def __init__(self, tok, kind: str, config: dict, chat_template: Any = None,
                 extra_eos_ids: Sequence[int] = ()):
        self._tok = tok
        self.kind = kind
        self.config = config
        # Special tokens named by the config (load_tokenizer added them to tok).
        self.special_tokens = {k: _token_str(config.get(k)) for k in _SPECIAL_KEYS}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        extra = [_token_str(x) for x in config.get("additional_special_tokens") or []]
        self.additional_special_tokens = [t for t in extra if t]
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids: list[int] = []
        for i in ([eos_id] if eos_id is not None else []) + [int(i) for i in extra_eos_ids]:
            if i not in self.eos_token_ids:
                self.eos_token_ids.append(i)

        # transformers replaces the file's post-processor when the config sets the flags (or when
        # there is none); otherwise the post-processor in tokenizer.json decides.
        self._use_flags = ("add_bos_token" in config or "add_eos_token" in config
                           or tok.post_processor is None)
        self.add_bos_token = (bool(config.get("add_bos_token", False))
                              and self.bos_token_id is not None)
        self.add_eos_token = bool(config.get("add_eos_token", False)) and eos_id is not None
        self._eos_id = eos_id
        # transformers skips clean-up for BPE models (it would eat spaces before punctuation).
        self._clean_up = (bool(config.get("clean_up_tokenization_spaces", False))
                          and type(tok.model).__name__ != "BPE")

        if isinstance(chat_template, list):
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default")
        self.chat_template: str | None = chat_template if isinstance(chat_template, str) else None
        self._compiled_template = None

        model = tok.model
        self._byte_ids = frozenset()
        if getattr(model, "byte_fallback", False):
            self._byte_ids = frozenset(i for t, i in tok.get_vocab().items()
                                       if _BYTE_PIECE.match(t))
        # What token_bytes needs: whether pieces are spelt in the byte-level alphabet (GPT-2's
        # and LLaMA 3's BPE), and which ids are added tokens (spelt as their text).
        decoder = json.loads(tok.decoder.__getstate__()) if tok.decoder is not None else {}
        self._byte_level = '"ByteLevel"' in json.dumps(decoder)
        self._added_ids = frozenset(tok.get_added_tokens_decoder())
        self.special_token_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._token_bytes: dict[int, bytes] = {}

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def __len__(self) -> int:
        return self.vocab_size

    # -- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """(ids, where each token begins in text, in characters): a BOS added before the text
        begins at 0, an EOS added after it at len(text)."""
        check_unicode(text)
        if not self._use_flags:
            encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
            return encoding.ids, [start for start, _ in encoding.offsets]
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids, starts = encoding.ids, [start for start, _ in encoding.offsets]
        if add_special_tokens:
            if self.add_bos_token:
                ids, starts = [self.bos_token_id] + ids, [0] + starts
            if self.add_eos_token:
                ids, starts = ids + [self._eos_id], starts + [len(text)]
        return ids, starts

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ids; an id past the vocabulary (a model's padded embedding rows) decodes
        to nothing, as in transformers. Raises TokenizerError for ids that are not token ids."""
        try:
            text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as exc:  # negative, too large for the library, not an int
            raise TokenizerError(f"token ids to decode must be non-negative integers ({exc})") from None
        return _clean_up_spaces(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token_id stands for inside a text: a byte-level BPE token's bytes, a
        SentencePiece piece with its word-start mark as a space, a byte-fallback piece's one
        byte, an added token's text. Empty for an id past the vocabulary. A token may hold part
        of a UTF-8 character: its bytes alone are then not text."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            out = b""
        elif token_id in self._added_ids:
            out = piece.encode()
        elif token_id in self._byte_ids:
            out = bytes([int(piece[3:5], 16)])
        elif self._byte_level:
            # A char outside the byte alphabet can only come from an odd vocabulary: kept as text.
            out = b"".join(bytes([_BYTE_OF_CHAR[c]]) if c in _BYTE_OF_CHAR else c.encode() for c in piece)
        else:
            out = piece.replace("\u2581", " ").encode()
        self._token_bytes[token_id] = out
        return out

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render `messages` with the model's chat template, as transformers does."""
        import jinja2

        if self.chat_template is None:
            raise TokenizerError("this model has no chat template; give a plain prompt instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        # transformers drops keys whose value is None, so templates can test `is defined`.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = dict(self.special_tokens)
        context["additional_special_tokens"] = self.additional_special_tokens
        context.update(kwargs)
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - a filter or method the template calls on data it lacks
            raise TokenizerError(f"chat template error: {type(e).__name__}: {_one_line(e)}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs) -> list[int]:
        """Token ids of the rendered chat; BOS is added only if the template did not write it
        (first, or after whitespace only)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        ids = self.encode(text, add_special_tokens=False)
        if self.add_bos_token and not (self.bos_token and text.lstrip().startswith(self.bos_token)):
            ids = [self.bos_token_id] + ids
        return ids

    # -- streaming ----------------------------------------------------------------------------

    def stream_decoder(self, prompt_ids: Sequence[int] | None = None,
                       skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids, skip_special_tokens)


class StreamDecoder:
    """Incremental detokeniser: push ids one at a time, get the new text.

    Text is decoded in a small window: ids[prefix:read] is text already emitted, ids[prefix:] the
    same plus what is new, and the difference is emitted once it is final. Decoding a window
    (rather than single tokens) keeps SentencePiece's leading spaces right, since the window's
    first token is stripped the same way in both decodes. Text is held while it ends in U+FFFD
    (a UTF-8 character still incomplete) or in a byte-fallback token, because a run of byte
    tokens is decoded as one unit and a later byte can change how the whole run reads.

    A prompt may end partway through a character (its U+FFFD is not text yet): when generated
    bytes complete it, the character comes out with them. What the prompt alone leaves
    unfinished never comes out unless tokens are pushed.
    """

    _CONTEXT = 6  # prompt tokens kept so the first generated token sees its left context

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None,
                 skip_special_tokens: bool):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        ids = list(prompt_ids or [])
        if skip_special_tokens:
            # Skipped tokens decode to nothing wherever they are (and are never in the window):
            # left in, a prompt ending in many of them would leave the window no text for the
            # first generated token to follow.
            ids = [i for i in ids if i not in tokenizer.special_token_ids]
        start = max(0, len(ids) - self._CONTEXT)
        # Never start the window inside a byte run: it would decode differently than in full.
        while start > 0 and ids[start - 1] in tokenizer._byte_ids:
            start -= 1
        self._ids = ids[start:]
        self._prefix = 0
        self._read = len(self._ids)
        self._at_prompt = True  # nothing emitted yet: ids[prefix:read] is the prompt's window

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _new_text(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if self._at_prompt and not text.startswith(prefix_text):
            prefix_text = self._settled_prompt_text(prefix_text)
        if not final and (len(text) <= len(prefix_text) or text.endswith("\ufffd")
                          or self._ids[-1] in self._tok._byte_ids):
            return ""
        self._prefix, self._read, self._at_prompt = self._read, len(self._ids), False
        return text[len(prefix_text):]

    def _settled_prompt_text(self, prompt_text: str) -> str:
        """prompt_text (the prompt window's text) less its last character where the prompt's bytes
        leave that character unfinished, so generated bytes complete it."""
        tok, ids = self._tok, self._ids[:self._read]
        run = len(ids)
        while run > 0 and ids[run - 1] in tok._byte_ids:
            run -= 1
        if run < len(ids):
            # Byte fallback decodes a run of byte tokens as one unit, to U+FFFD for each byte
            # unless all of it is valid UTF-8: the whole run is open.
            if _ends_unfinished(b"".join(map(tok.token_bytes, ids[run:])), errors="strict"):
                return self._decode(ids[:run])
            return prompt_text
        # Byte-level BPE decodes an unfinished last character as one U+FFFD.
        if _ends_unfinished(b"".join(map(tok.token_bytes, ids))) and prompt_text.endswith("\ufffd"):
            return prompt_text[:-1]
        return prompt_text

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._skip and token_id in self._tok.special_token_ids:
            return ""  # decodes to nothing: a byte run on both sides of it decodes as one run
        self._ids.append(token_id)
        return self._new_text(final=False)

    def flush(self) -> str:
        """Whatever is still held (an unfinished character comes out as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._new_text(final=True)


def _ends_unfinished(data: bytes, errors: str = "replace") -> bool:
    """Whether data ends partway through a UTF-8 character, the bytes of which are valid so far;
    with errors="strict", also that nothing before it is invalid."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    try:
        decoder.decode(data)
    except UnicodeDecodeError:
        return False
    return bool(decoder.getstate()[0])


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes as printable characters: the bytes that are printable
    Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, and the others, in
    order, for the characters from U+0100 on. Returns char -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return alphabet


_BYTE_OF_CHAR = _byte_alphabet()


def _compile_template(source: str):
    """Compile a chat template with transformers' environment and helpers."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not jinja's own tojson: that one HTML-escapes, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_block()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {_one_line(e)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _generation_block():
    """`{% generation %}...{% endgeneration %}`, which transformers' templates use to mark the
    assistant's text for training masks: rendered as its body, as transformers renders it."""
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationBlock


def _clean_up_spaces(text: str) -> str:
    # transformers' clean_up_tokenization (WordPiece-era artefacts).
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
