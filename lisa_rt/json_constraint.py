"""JSON output constrained by a JSON schema: which tokens may come next.

A schema is compiled once into a graph of nodes (SchemaNodes); a sequence's position in
its output is a set of parse stacks over those nodes, advanced byte by byte (`JsonGrammar.step`).
A stack is a tuple of frames (tuples, so that states hash and masks can be cached), the frame
of the value being written on top. A set, because a byte can be read more than one way (anyOf,
enum values sharing a prefix, a number that may or may not go on).

The tokens allowed in a state are found by walking a trie of the vocabulary's byte strings
with the state, pruning a branch as soon as its bytes leave the grammar. Inside a free string
(most of what a model writes) nearly every token is allowed and none changes the state, so there
the walk covers only the few tokens holding a quote, a backslash, a control byte or part of a
UTF-8 character, and the rest come from a precomputed mask. Masks are cached per state, for
every grammar within one byte budget (MASK_CACHE_BYTES).

The output is the value alone: whitespace may lead and separate (runs of at most
MAX_WHITESPACE), never trail; the sequence ends when nothing can follow the value, or with an
end-of-sequence token where something still could (a number at the top level).
"""
from __future__ import annotations

import itertools
import json
import re
import threading
import urllib.parse
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import torch

from .errors import UserError

MAX_WHITESPACE = 64    # bytes in one run of whitespace: a model cannot pad forever
MAX_DEPTH = 64         # open frames (nested values): bounds a recursive schema's output
MAX_NUMBER_BYTES = 32  # "-1.2345678901234567e+308" is 24: longer is a model repeating itself
MAX_KEY_BYTES = 256    # a free property name that must be remembered (to choose its schema)
MAX_SCHEMA_NODES = 10_000
MAX_STACKS = 64        # readings of the output so far at once (anyOf fan-out)
MAX_BOUND = 2**30      # a maxLength or maxItems above this is no bound at all
MASK_CACHE_BYTES = 256 << 20  # every grammar's masks together (a 49,152-token mask: 48 KiB)
GRAMMARS_CACHED = 16   # compiled schemas, and grammars per vocabulary

# Keywords that describe but do not constrain: read past.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id",
                          "$comment", "$defs", "definitions", "readOnly", "writeOnly",
                          "deprecated"})
_KNOWN = _ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items",
                         "minItems", "maxItems", "minLength", "maxLength", "enum", "const",
                         "anyOf", "oneOf", "allOf", "$ref"}
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")  # an array index in a JSON pointer
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')

# Number states; the final ones may end the number.
_MINUS, _ZERO, _INT, _DOT, _FRAC, _E, _ESIGN, _EXP = range(8)
_NUMBER_FINAL = frozenset({_ZERO, _INT, _FRAC, _EXP})
# Object phases: after '{', after ',', after a property name, after a value.
_OPEN, _NEXT, _NAMED, _VALUE = range(4)
# String escape states: 0 plain; 1 after '\'; 10 + k: k hex digits of \uXXXX to come; 15: after
# \uD; 20 + k: k UTF-8 continuation bytes to come; 30 + lead byte - 0xE0: a 3- or 4-byte
# character's first continuation byte to come, whose range depends on the lead byte; 60-65: a
# surrogate pair (\uD800-\uDBFF, then at once \uDC00-\uDFFF), one character: 60 and 61 the high
# half's last two hex digits, 62-65 the low half's \, u, D and C-F. A lone surrogate is
# refused, so that every string is Unicode text.
_PLAIN, _BACKSLASH, _HEX_LEFT, _HEX_AFTER_D, _UTF8_LEFT, _HIGH_SURROGATE = 0, 1, 10, 15, 20, 60
_LOW_SURROGATE_START = {62: b"\\", 63: b"u", 64: b"dD", 65: b"cdefCDEF"}
_UTF8_FIRST = {lead: 30 + lead - 0xE0 for lead in range(0xE0, 0xF5)}
_UTF8_FIRST_RANGE = {30 + lead - 0xE0: (
    {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF)),
    1 if lead < 0xF0 else 2) for lead in range(0xE0, 0xF5)}


class JsonConstraintError(UserError):
    """A request's output cannot go on within its schema (too many ways to read it, or no
    token that fits): that request fails, not the batch it is in."""


def _bad(message: str) -> UserError:
    return UserError(f"invalid json_schema: {message}")


class SchemaNodes:
    """A schema compiled to nodes, by index (the schema's is root_node). Each node is a tuple:
    ("object", {name: node}, {name: encoded name}, required, additional node or None),
    ("array", items node, min, max or None), ("string", min, max or None), ("number", integer),
    ("literal", (JSON texts, as bytes)), ("union", (nodes))."""

    def __init__(self, schema: Any):
        self.root = schema
        self.nodes: list[tuple | None] = []
        self._by_schema: dict[int, int] = {}   # id(subschema) -> its node ($refs, cycles)
        self._by_value: dict[tuple, int] = {}  # a node's value -> the first node of that value
        self._cyclic: set[int] = set()         # nodes reached through a cycle: never merged
        self._any: int | None = None
        self.free_string = self._new(("string", 0, None))  # property names read and forgotten
        self.root_node = self._compile(schema, "#")
        self._check_no_empty_cycles()

    def _check_no_empty_cycles(self) -> None:
        """Refuses a schema that reaches itself through $ref and anyOf alone, before writing a
        byte ({"$ref": "#"}): choosing its first byte would never end."""
        done: set[int] = set()

        def visit(index: int, path: set[int]) -> None:
            node = self.nodes[index]
            if node[0] != "union" or index in done:
                return
            if index in path:
                raise _bad("a $ref or anyOf cycle that never writes a value")
            path.add(index)
            for option in node[1]:
                visit(option, path)
            path.discard(index)
            done.add(index)

        for index in range(len(self.nodes)):
            visit(index, set())

    def _new(self, node: tuple | None = None) -> int:
        if len(self.nodes) >= MAX_SCHEMA_NODES:
            raise _bad(f"more than {MAX_SCHEMA_NODES} nodes")
        self.nodes.append(node)
        return len(self.nodes) - 1

    def any_value(self) -> int:
        """Any JSON value (objects and arrays of any values)."""
        if self._any is None:
            self._any = self._new()
            obj = self._new(("object", {}, {}, frozenset(), self._any))
            arr = self._new(("array", self._any, 0, None))
            text = self.free_string
            number = self._new(("number", False))
            words = self._new(("literal", (b"true", b"false", b"null")))
            self.nodes[self._any] = ("union", (obj, arr, text, number, words))
        return self._any

    def _compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.any_value()
        if schema is False:
            raise _bad(f"{where} is false: no value satisfies it")
        if not isinstance(schema, dict):
            raise _bad(f"{where} must be an object or a boolean, got {type(schema).__name__}")
        key = id(schema)  # (the root holds every subschema: ids stay unique while compiling)
        if key in self._by_schema:
            index = self._by_schema[key]
            if self.nodes[index] is None:  # reached again while being compiled: a cycle
                self._cyclic.add(index)
            return index
        index = self._new()
        self._by_schema[key] = index
        self.nodes[index] = self._node(schema, where)
        if index not in self._cyclic:
            # Equal subschemas (copies of one option, wrappers of one $ref) share one node, so
            # that anyOf options that are copies of each other do not multiply the readings of
            # the output. Nodes are compared by value, children by node: linear in the schema.
            index = self._by_value.setdefault(_node_key(self.nodes[index]), index)
            self._by_schema[key] = index
        return index

    def _node(self, schema: dict, where: str) -> tuple:
        unknown = sorted(k for k in schema if k not in _KNOWN)
        if unknown:
            raise _bad(f"keyword '{unknown[0]}' at {where} is not supported (supported: type, "
                       "properties, required, additionalProperties, items, minItems, maxItems, "
                       "minLength, maxLength, enum, const, anyOf, oneOf, allOf of one schema, $ref)")
        if "$ref" in schema:
            _alone(schema, "$ref", where)
            target = self._resolve(schema["$ref"], where)
            return ("union", (self._compile(target, schema["$ref"]),))
        if "const" in schema or "enum" in schema:
            return self._literal(schema, where)
        for word in ("anyOf", "oneOf", "allOf"):
            if word in schema:
                options = schema[word]
                if not isinstance(options, list) or not options:
                    raise _bad(f"{word} at {where} must be a non-empty list")
                if word == "allOf" and len(options) != 1:
                    raise _bad(f"allOf at {where} with more than one schema is not supported")
                _alone(schema, word, where)
                # oneOf is read as anyOf: exclusivity cannot be checked while writing.
                return ("union", tuple(dict.fromkeys(self._compile(s, f"{where}/{word}/{i}")
                                                     for i, s in enumerate(options))))
        if "type" in schema:
            types = _types(schema, where)
        else:
            types = [t for t, words in (("object", ("properties", "required", "additionalProperties")),
                                        ("array", ("items", "minItems", "maxItems")),
                                        ("string", ("minLength", "maxLength"))) if any(w in schema for w in words)]
            if not types:  # annotations alone: any value
                return ("union", (self.any_value(),))
        options = [self._typed(t, schema, where) for t in dict.fromkeys(types)]
        return options[0] if len(options) == 1 else ("union", tuple(self._new(o) for o in options))

    def _literal(self, schema: dict, where: str) -> tuple:
        """enum or const: the values' JSON texts. Beside them only `type` is read (each value
        must be of it); other constraints beside them are refused rather than left unchecked."""
        word = "const" if "const" in schema else "enum"
        _alone(schema, word, where, also=("type",))
        values = [schema["const"]] if word == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise _bad(f"enum at {where} must be a non-empty list")
        if "type" in schema:
            types = _types(schema, where)
            for value in values:
                if not any(_is_of_type(value, t) for t in types):
                    raise _bad(f"the {word} value {value!r} at {where} is not of its type {schema['type']!r}")
        return ("literal", tuple(dict.fromkeys(_json_text(v, where) for v in values)))

    def _typed(self, kind: str, schema: dict, where: str) -> tuple:
        if kind == "object":
            props = schema.get("properties", {})
            if not isinstance(props, dict):
                raise _bad(f"properties at {where} must be an object")
            required = schema.get("required", [])
            if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
                raise _bad(f"required at {where} must be a list of names")
            extra = schema.get("additionalProperties", not props)
            additional = None if extra is False else self._compile(extra, f"{where}/additionalProperties")
            missing = [r for r in required if r not in props]
            if missing:
                raise _bad(f"required property '{missing[0]}' at {where} is not in its properties")
            nodes = {name: self._compile(s, f"{where}/properties/{name}") for name, s in props.items()}
            encoded = {name: _json_text(name, where)[1:-1] for name in props}
            return ("object", nodes, encoded, frozenset(required), additional)
        if kind == "array":
            lo, hi = _bounds(schema, "minItems", "maxItems", where)
            items = schema.get("items", True)
            return ("array", self._compile(items, f"{where}/items"), lo, hi)
        if kind == "string":
            lo, hi = _bounds(schema, "minLength", "maxLength", where)
            return ("string", lo, hi)
        if kind in ("number", "integer"):
            return ("number", kind == "integer")
        return ("literal", (b"true", b"false") if kind == "boolean" else (b"null",))

    def _resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _bad(f"$ref at {where} must point into the schema itself ('#' or '#/...'), got {ref!r}")
        target = self.root
        parts = urllib.parse.unquote(ref[2:]).split("/") if ref != "#" else []  # a JSON pointer
        for part in parts:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and _INDEX.fullmatch(part) and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise _bad(f"$ref {ref!r} at {where} points to nothing")
        return target


def _node_key(node: tuple) -> tuple:
    """A node as a hashable value (an object's property dicts as sorted pairs)."""
    if node[0] == "object":
        return ("object", tuple(sorted(node[1].items())), node[3], node[4])
    return node


def _alone(schema: dict, word: str, where: str, also: tuple[str, ...] = ()) -> None:
    """Refuses keywords beside `word` (and `also`) that would constrain the value further:
    lisa-rt does not combine them, and leaving them unchecked would let output break them."""
    others = [k for k in schema if k not in _ANNOTATIONS and k != word and k not in also]
    if others:
        raise _bad(f"{word} at {where} beside '{others[0]}' is not supported")


def _types(schema: dict, where: str) -> list[str]:
    types = schema["type"]
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not types or any(not isinstance(t, str) or t not in _TYPES for t in types):
        raise _bad(f"type at {where} must be one of {', '.join(_TYPES)} or a list of them, got {schema['type']!r}")
    return types


def _bounds(schema: dict, lo_name: str, hi_name: str, where: str) -> tuple[int, int | None]:
    for name in (lo_name, hi_name):
        value = schema.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(f"{name} at {where} must be an integer >= 0, got {value!r}")
    lo, hi = schema.get(lo_name, 0), schema.get(hi_name)
    if hi is not None and hi < lo:
        raise _bad(f"{hi_name} at {where} is below {lo_name}")
    return lo, (None if hi is not None and hi > MAX_BOUND else hi)


def _is_of_type(value: Any, kind: Any) -> bool:
    """Whether a JSON value is of a JSON Schema type (an integer: a number with no fraction)."""
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and value.is_integer())
    python = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return kind in python and isinstance(value, python[kind]) and (kind == "boolean" or not isinstance(value, bool))


def _json_text(value: Any, where: str) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:  # (UnicodeEncodeError: a lone surrogate in a string)
        raise _bad(f"a value or name at {where} is not JSON text: {exc}") from None


def check_schema(schema: Any) -> Any:
    """Raises UserError unless lisa-rt can constrain output to `schema`; returns it."""
    _compiled(schema)
    return schema


_compile_cache: OrderedDict = OrderedDict()
_compile_lock = threading.Lock()


def _compiled(schema: Any) -> SchemaNodes:
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _bad(f"not JSON: {exc}") from None
    except RecursionError:
        raise _bad("nested too deeply") from None
    with _compile_lock:
        if key in _compile_cache:
            _compile_cache.move_to_end(key)
            return _compile_cache[key]
    try:
        nodes = SchemaNodes(json.loads(key))
    except RecursionError:
        raise _bad("nested too deeply") from None
    with _compile_lock:
        _compile_cache[key] = nodes
        while len(_compile_cache) > GRAMMARS_CACHED:
            _compile_cache.popitem(last=False)
    return nodes


class Vocabulary:
    """A tokenizer's tokens as bytes, in tries, for walking with a grammar state: `trie` holds
    every text token; `unsafe` only those a free JSON string cannot take whole without changing
    state (`string_safe` marks the others, `chars` counts their characters, `lengths` their
    bytes)."""

    def __init__(self, token_bytes: Sequence[bytes], width: int):
        """token_bytes[id]: the bytes of each text token (empty for a special token, which a
        grammar never allows); width: the model's logits' width (at least len(token_bytes))."""
        self.width = width
        self.spelled = list(token_bytes)
        self._grammars: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.string_safe = torch.zeros(width, dtype=torch.bool)
        self.chars = torch.zeros(width, dtype=torch.int32)
        self.lengths = torch.tensor([len(b) for b in token_bytes] + [0] * (width - len(token_bytes)), dtype=torch.int32)
        self.trie, self.unsafe = _Trie(), _Trie()
        for token, spelled in enumerate(token_bytes):
            if not spelled:
                continue
            self.trie.add(token, spelled)
            if _string_safe(spelled):
                self.string_safe[token] = True
                self.chars[token] = len(spelled.decode())
            else:
                self.unsafe.add(token, spelled)


    def grammar(self, schema: Any, eos_ids: Sequence[int]) -> "JsonGrammar":
        """The grammar of `schema` over this vocabulary, shared by every request that asks for
        the same schema, so that they share its masks."""
        key = (json.dumps(schema, sort_keys=True), tuple(sorted(eos_ids)))
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        grammar = JsonGrammar(schema, self, eos_ids)
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > GRAMMARS_CACHED:
                self._grammars.popitem(last=False)
        return grammar

    def clear_grammars(self) -> None:
        """Forgets the grammars and their masks (a benchmark measures a cold start with it)."""
        with self._lock:
            self._grammars.clear()


_vocabulary_lock = threading.Lock()
_vocabularies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocabulary_of(tokenizer, width: int) -> Vocabulary:
    """The tokenizer's Vocabulary for logits `width` wide, built once (about a second for
    49,152 tokens) and kept while the tokenizer is."""
    with _vocabulary_lock:
        cached = _vocabularies.get(tokenizer)
        if cached is None or cached.width != width:
            special = tokenizer.special_token_ids
            spelled = [b"" if i in special else tokenizer.token_bytes(i) for i in range(min(len(tokenizer), width))]
            cached = Vocabulary(spelled, width)
            _vocabularies[tokenizer] = cached
        return cached


def _string_safe(spelled: bytes) -> bool:
    if any(b < 0x20 or b in (0x22, 0x5C) for b in spelled):
        return False
    try:
        spelled.decode()
    except UnicodeDecodeError:
        return False
    return True


class _Trie:
    def __init__(self):
        self.children: list[dict[int, int]] = [{}]
        self.tokens: list[list[int]] = [[]]

    def add(self, token: int, spelled: bytes) -> None:
        node = 0
        for byte in spelled:
            child = self.children[node].get(byte)
            if child is None:
                child = len(self.children)
                self.children.append({})
                self.tokens.append([])
                self.children[node][byte] = child
            node = child
        self.tokens[node].append(token)


State = frozenset  # of stacks: tuples of frames


class _MaskCache:
    """Token masks by (grammar, state), least recently used first out, within one byte budget
    for every grammar, so that many schemas (or long counted strings) cannot grow it unbounded."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key) -> torch.Tensor | None:
        with self.lock:
            mask = self.entries.get(key)
            if mask is not None:
                self.entries.move_to_end(key)
            return mask

    def put(self, key, mask: torch.Tensor) -> None:
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = mask
            self.used += mask.numel()
            while self.used > self.budget and len(self.entries) > 1:
                self.used -= self.entries.popitem(last=False)[1].numel()


_masks = _MaskCache(MASK_CACHE_BYTES)
_grammar_serials = itertools.count()


class JsonGrammar:
    """One schema over one vocabulary: states, steps and the token masks of states."""

    def __init__(self, schema: Any, vocabulary: Vocabulary, eos_ids: Sequence[int]):
        self.schema = _compiled(schema)
        self.nodes = self.schema.nodes
        self.vocabulary = vocabulary
        self.eos_ids = sorted(set(int(i) for i in eos_ids if 0 <= int(i) < vocabulary.width))
        self.initial: State = frozenset({(("val", self.schema.root_node, 0),)})
        self._serial = next(_grammar_serials)  # its masks' key (an id() could be reused)

    # -- states ---------------------------------------------------------------------------

    def advance(self, state: State, spelled: bytes) -> State:
        for byte in spelled:
            state = self.step(state, byte)
            if not state:
                break
        return state

    def step(self, state: State, byte: int) -> State:
        out = []
        for stack in state:
            out.extend(self._step(stack, byte))
        after = frozenset(out)
        if len(after) > MAX_STACKS:
            raise JsonConstraintError(f"the JSON schema allows more than {MAX_STACKS} readings of the output at once "
                                      "(anyOf options that begin alike, nested): simplify it")
        return after

    @staticmethod
    def accepting(state: State) -> bool:
        """Whether the value may end here."""
        return any(not stack or (len(stack) == 1 and stack[0][0] == "num" and stack[0][3] in _NUMBER_FINAL)
                   for stack in state)

    @staticmethod
    def closed(state: State) -> bool:
        """Whether the value is complete and nothing can follow it."""
        return state == frozenset({()})

    # -- masks ----------------------------------------------------------------------------

    def allowed(self, state: State) -> torch.Tensor:
        """bool [vocabulary width]: the tokens that may follow `state` (the end-of-sequence
        tokens where, and only where, the value may end). JsonConstraintError where nothing
        may: the request cannot go on and still give JSON that validates."""
        key = (self._serial, state)
        mask = _masks.get(key)
        if mask is not None:
            return mask
        mask = self._mask(state)
        mask[self.eos_ids] = False  # (an end-of-sequence token with text of its own, too)
        if not self.accepting(state) and not bool(mask.any()):
            raise JsonConstraintError("no token can continue the JSON value here (the schema nests deeper "
                                      f"than {MAX_DEPTH}, or the vocabulary cannot spell what it needs)")
        mask[self.eos_ids] = self.accepting(state)
        _masks.put(key, mask)
        return mask

    def _mask(self, state: State) -> torch.Tensor:
        vocab = self.vocabulary
        mask = self._inside_free_string(state)
        trie = vocab.trie if mask is None else vocab.unsafe
        if mask is None:
            mask = torch.zeros(vocab.width, dtype=torch.bool)
        allowed: list[int] = []
        pending = [(0, state)]
        while pending:
            node, here = pending.pop()
            for byte, child in trie.children[node].items():
                try:
                    after = self.step(here, byte)
                except JsonConstraintError:  # too many readings down this branch: not allowed
                    continue
                if after:
                    allowed.extend(trie.tokens[child])
                    if trie.children[child]:
                        pending.append((child, after))
        if allowed:
            mask[allowed] = True
        return mask

    def _inside_free_string(self, state: State) -> torch.Tensor | None:
        """Where every reading of the output is inside a string that takes any character (not
        in an escape or a character), up to a length: the string-safe tokens that fit one of
        them (a new tensor), since such a token only lengthens each; else None."""
        vocab = self.vocabulary
        mask = None
        for stack in state:
            frame = stack[-1] if stack else ("",)
            if frame[0] == "str" and frame[3] == _PLAIN:
                hi = self.nodes[frame[1]][2]
                fits = vocab.string_safe if hi is None else vocab.string_safe & (vocab.chars <= hi - frame[2])
            elif frame[0] == "key" and frame[1] is None and frame[3] == _PLAIN:
                room = self._key_limit(stack[-2][1]) - len(frame[2])
                fits = vocab.string_safe & (vocab.lengths <= room)
            else:
                return None
            mask = fits.clone() if mask is None else mask | fits
        return mask

    # -- one stack, one byte ----------------------------------------------------------------

    def _step(self, stack: tuple, byte: int) -> list[tuple]:
        if not stack:
            return []
        frame, rest = stack[-1], stack[:-1]
        kind = frame[0]
        if kind == "str":
            return self._string(frame, rest, byte)
        if kind == "val":
            if byte in _WS:
                return [rest + (("val", frame[1], frame[2] + 1),)] if frame[2] < MAX_WHITESPACE else []
            return [rest + frames for frames in self._start(frame[1], byte, len(rest))]
        if kind == "lit":
            return [rest + frames for frames in _literal_byte(frame[1], frame[2], byte)]
        if kind == "num":
            return self._number(frame, rest, byte)
        if kind == "obj":
            return self._object(frame, rest, byte)
        if kind == "arr":
            return self._array(frame, rest, byte)
        if kind == "key":
            return self._named_key(frame, rest, byte)
        raise AssertionError(kind)

    def _start(self, index: int, byte: int, depth: int) -> list[tuple]:
        """The frames that replace a value of node `index` whose first byte is `byte`."""
        node = self.nodes[index]
        kind = node[0]
        if kind == "union":
            return [frames for option in node[1] for frames in self._start(option, byte, depth)]
        if kind == "literal":
            return _literal_byte(node[1], 0, byte)
        if depth >= MAX_DEPTH:
            return []
        if kind == "string":
            return [(("str", index, 0, _PLAIN),)] if byte == 0x22 else []
        if kind == "number":
            if byte == 0x2D:
                return [(("num", index, 1, _MINUS),)]
            if byte in _DIGITS:
                return [(("num", index, 1, _ZERO if byte == 0x30 else _INT),)]
            return []
        if kind == "object":
            return [(("obj", index, _OPEN, frozenset(), None, 0),)] if byte == 0x7B else []
        if kind == "array":
            if byte != 0x5B:
                return []
            return [(("arr", index, _OPEN, 0, 0),)]
        raise AssertionError(kind)

    def _string(self, frame: tuple, rest: tuple, byte: int) -> list[tuple]:
        _, index, count, esc = frame
        lo, hi = self.nodes[index][1], self.nodes[index][2]
        if esc == _PLAIN and byte == 0x22:
            return [rest] if count >= lo else []
        moved = _string_byte(esc, byte)
        if moved is None:
            return []
        new_esc, new_char = moved
        if new_char and (lo > 0 or hi is not None):
            # Counted only as far as a bound needs, so that most strings keep one state.
            count = count + 1 if hi is not None else min(count + 1, lo)
            if hi is not None and count > hi:
                return []
        return [rest + (("str", index, count, new_esc),)]

    def _number(self, frame: tuple, rest: tuple, byte: int) -> list[tuple]:
        _, index, length, at = frame
        integer = self.nodes[index][1]
        nxt = None
        if byte in _DIGITS:
            nxt = {_MINUS: _ZERO if byte == 0x30 else _INT, _INT: _INT, _DOT: _FRAC, _FRAC: _FRAC,
                   _E: _EXP, _ESIGN: _EXP, _EXP: _EXP}.get(at)
        elif byte == 0x2E and not integer and at in (_ZERO, _INT):
            nxt = _DOT
        elif byte in (0x65, 0x45) and not integer and at in (_ZERO, _INT, _FRAC):
            nxt = _E
        elif byte in (0x2B, 0x2D) and at == _E:
            nxt = _ESIGN
        if nxt is not None:
            # A state that needs a digit more (after '-', '.', 'e' or its sign) leaves room for it.
            room = MAX_NUMBER_BYTES - (length + 1) - (0 if nxt in _NUMBER_FINAL else 1)
            return [rest + (("num", index, length + 1, nxt),)] if room >= 0 else []
        if at in _NUMBER_FINAL:  # the number ended: the byte is the parent's
            return self._step(rest, byte)
        return []

    def _object(self, frame: tuple, rest: tuple, byte: int) -> list[tuple]:
        _, index, phase, seen, key, ws = frame
        _, props, encoded, required, additional = self.nodes[index]
        if byte in _WS:
            return [rest + (frame[:5] + (ws + 1,),)] if ws < MAX_WHITESPACE else []
        if phase in (_OPEN, _NEXT) and byte == 0x22:
            names = tuple(sorted(encoded[n] for n in props if n not in seen))
            parent = ("obj", index, _NAMED, seen, None, 0)
            if additional is None:
                return [rest + (parent, ("key", names, b"", _PLAIN))] if names else []
            if not props:  # any name: the name itself need not be remembered
                return [rest + (parent, ("str", self.schema.free_string, 0, _PLAIN))]
            return [rest + (parent, ("key", None, b"", _PLAIN))]
        if byte == 0x7D and phase in (_OPEN, _VALUE):
            return [rest] if required <= seen else []
        if phase == _NAMED and byte == 0x3A:
            child = props[key] if key is not None else additional
            return [rest + (("obj", index, _VALUE, seen, None, 0), ("val", child, 0))]
        if phase == _VALUE and byte == 0x2C:
            more = additional is not None or any(n not in seen for n in props)
            return [rest + (("obj", index, _NEXT, seen, None, 0),)] if more else []
        return []

    def _array(self, frame: tuple, rest: tuple, byte: int) -> list[tuple]:
        _, index, phase, count, ws = frame
        _, items, lo, hi = self.nodes[index]
        if byte in _WS:
            return [rest + (frame[:4] + (ws + 1,),)] if ws < MAX_WHITESPACE else []
        if byte == 0x5D and (phase == _OPEN and lo == 0 or phase == _VALUE and count >= lo):
            return [rest]
        if phase == _VALUE:
            if byte == 0x2C and (hi is None or count < hi):
                return [rest + (("arr", index, _NEXT, count, 0),)]
            return []
        if hi == 0:
            return []
        # Items are counted only up to what a bound needs, so that most arrays keep one state.
        counted = count + 1 if hi is not None else min(count + 1, lo)
        parent = ("arr", index, _VALUE, counted, 0)
        return [rest + (parent,) + frames for frames in self._start(items, byte, len(rest) + 1)]

    def _named_key(self, frame: tuple, rest: tuple, byte: int) -> list[tuple]:
        """A property name: one of `names` (JSON-encoded bytes), or (names None) any name,
        read whole to choose between a listed property's schema and additionalProperties."""
        _, names, typed, esc = frame
        parent = rest[-1]
        # A listed name closes only once it is whole (its encoded form never holds a bare quote,
        # so a quote after a partial one is an escaped quote of a longer name, or nothing).
        if byte == 0x22 and esc == _PLAIN and (names is None or typed in names):
            name = json.loads(b'"' + typed + b'"')
            if names is None and name not in self.nodes[parent[1]][1]:
                return [rest[:-1] + (parent[:4] + (None, 0),)]
            if name in parent[3]:
                return []
            return [rest[:-1] + (parent[:3] + (parent[3] | {name}, name, 0),)]
        typed += bytes([byte])
        if names is not None:
            if not any(n.startswith(typed) for n in names):
                return []
            return [rest + (("key", names, typed, _PLAIN),)]
        moved = _string_byte(esc, byte)
        # (An escape or character begun must have room to end within the limit.)
        if moved is None or len(typed) + _bytes_to_finish(moved[0]) > self._key_limit(parent[1]):
            return []
        return [rest + (("key", None, typed, moved[0]),)]

    def _key_limit(self, obj: int) -> int:
        """The most bytes a name of object node `obj` that must be remembered may take: every
        listed name fits, however long."""
        return max([MAX_KEY_BYTES] + [len(name) for name in self.nodes[obj][2].values()])


def _literal_byte(texts: tuple[bytes, ...], pos: int, byte: int) -> list[tuple]:
    """Byte `pos` of one of the JSON texts `texts` (enum or const values, true, false, null):
    the frames after it, () where a text ends with it, a "lit" frame where some go on."""
    texts = tuple(t for t in texts if t[pos] == byte)
    done = [()] if any(len(t) == pos + 1 for t in texts) else []
    going = tuple(t for t in texts if len(t) > pos + 1)
    return done + ([(("lit", going, pos + 1),)] if going else [])


def _bytes_to_finish(esc: int) -> int:
    """The fewest bytes that end an escape or character begun (string escape state esc)."""
    if esc == _PLAIN:
        return 0
    if esc == _BACKSLASH:
        return 1
    if _HEX_LEFT < esc <= _HEX_LEFT + 4:
        return esc - _HEX_LEFT
    if esc == _HEX_AFTER_D:
        return 3
    if _UTF8_LEFT < esc <= _UTF8_LEFT + 3:
        return esc - _UTF8_LEFT
    if esc in _UTF8_FIRST_RANGE:
        return 1 + _UTF8_FIRST_RANGE[esc][1]
    return {60: 8, 61: 7}.get(esc, 3 + 65 - esc)  # a surrogate pair: the high half's hex, \uDCxx


def _string_byte(esc: int, byte: int) -> tuple[int, bool] | None:
    """A string's byte other than its closing quote: (escape state after it, whether it starts
    a character), or None where a JSON string cannot have it."""
    if esc == _PLAIN:
        if byte == 0x5C:
            return _BACKSLASH, True
        if byte < 0x20 or byte == 0x22:
            return None
        if byte < 0x80:
            return _PLAIN, True
        if 0xC2 <= byte <= 0xDF:
            return _UTF8_LEFT + 1, True
        if 0xE0 <= byte <= 0xF4:  # the first continuation byte's range rules out overlong
            return _UTF8_FIRST[byte], True  # forms, surrogates and code points past U+10FFFF
        return None
    if esc == _BACKSLASH:
        if byte == 0x75:  # \uXXXX
            return _HEX_LEFT + 4, False
        return (_PLAIN, False) if byte in _ESCAPES else None
    if esc in _UTF8_FIRST_RANGE:
        (lo, hi), left = _UTF8_FIRST_RANGE[esc]
        return (_UTF8_LEFT + left, False) if lo <= byte <= hi else None
    if _UTF8_LEFT < esc <= _UTF8_LEFT + 3:
        return (esc - 1 if esc > _UTF8_LEFT + 1 else _PLAIN, False) if 0x80 <= byte <= 0xBF else None
    if esc == _HEX_LEFT + 4 and byte in b"dD":
        return _HEX_AFTER_D, False
    if esc == _HEX_AFTER_D:  # \uD8-\uDB: a high surrogate, whose low one must follow at once
        if 0x30 <= byte <= 0x37:
            return _HEX_LEFT + 2, False
        return (_HIGH_SURROGATE, False) if byte in b"89abAB" else None
    if esc == _HIGH_SURROGATE or esc == _HIGH_SURROGATE + 1:
        return (esc + 1, False) if byte in _HEX else None
    if esc in _LOW_SURROGATE_START:  # \, u, D, then C-F: the pair's second half, no new character
        return (esc + 1 if esc + 1 in _LOW_SURROGATE_START else _HEX_LEFT + 2, False) \
            if byte in _LOW_SURROGATE_START[esc] else None
    if _HEX_LEFT < esc <= _HEX_LEFT + 4:
        return (esc - 1 if esc > _HEX_LEFT + 1 else _PLAIN, False) if byte in _HEX else None
    raise AssertionError(esc)


class JsonMatcher:
    """One sequence's place in its output's grammar."""

    def __init__(self, grammar: JsonGrammar):
        self.grammar = grammar
        self.state: State = grammar.initial

    def allowed(self) -> torch.Tensor:
        return self.grammar.allowed(self.state)

    def advance(self, token: int) -> None:
        spelled = self.grammar.vocabulary.spelled[token] if token < len(self.grammar.vocabulary.spelled) else b""
        self.state = self.grammar.advance(self.state, spelled)

    @property
    def closed(self) -> bool:
        return JsonGrammar.closed(self.state)

    @property
    def accepting(self) -> bool:
        return JsonGrammar.accepting(self.state)
