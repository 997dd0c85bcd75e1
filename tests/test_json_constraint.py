"""Output constrained by a JSON schema (lisa_rt/json_constraint.py and where it is wired in).

The grammar's masks are checked against brute force (every token's bytes stepped through the
grammar) over a hand-made vocabulary along seeded random walks; what a walk completes must
parse and satisfy the schema (a small validator of the supported subset, below). Then single
behaviours at the byte level, schemas refused, and the constraint through the engine (a tiny
random model: a random model writes valid JSON only if the mask works), the server's
response_format and the command line's --json-schema.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lisa_rt.errors import UserError
from lisa_rt.json_constraint import (MAX_DEPTH, MAX_KEY_BYTES, MAX_NUMBER_BYTES, MAX_WHITESPACE,
                                     JsonConstraintError, JsonGrammar, JsonMatcher, Vocabulary, check_schema,
                                     vocabulary_of)
from lisa_rt.sampling import SamplingParams

# --- a validator of the supported subset --------------------------------------------------------

_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class _Pairs(dict):
    """A parsed JSON object that remembers its names in order, repeats included."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.names = [name for name, _ in pairs]


def _loads(text: str):
    return json.loads(text, object_pairs_hook=_Pairs)


def _json_equal(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true != 1 and "1" != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _resolve(ref: str, root):
    target = root
    for part in filter(None, ref[1:].split("/")):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target


def _valid(value, schema, root) -> bool:
    """Whether `value` satisfies `schema` (a part of `root`), as lisa-rt documents the subset:
    additionalProperties defaults to false where properties are given. Keywords of a type apply
    only to values of that type (standard JSON Schema); a listed property repeated is invalid."""
    if schema is True:
        return True
    if schema is False:
        return False
    if "$ref" in schema:
        return _valid(value, _resolve(schema["$ref"], root), root)
    if "const" in schema and not _json_equal(value, schema["const"]):
        return False
    if "enum" in schema and not any(_json_equal(value, v) for v in schema["enum"]):
        return False
    if "anyOf" in schema and not any(_valid(value, s, root) for s in schema["anyOf"]):
        return False
    if "oneOf" in schema and not any(_valid(value, s, root) for s in schema["oneOf"]):
        return False
    if "allOf" in schema and not all(_valid(value, s, root) for s in schema["allOf"]):
        return False
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_TYPE_CHECKS[t](value) for t in types):
            return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", not props)
        names = getattr(value, "names", list(value))
        if any(names.count(n) > 1 for n in props):
            return False
        if any(r not in value for r in schema.get("required", [])):
            return False
        for name, item in value.items():
            sub = props.get(name, extra)
            if sub is False or not _valid(item, True if sub == {} else sub, root):
                return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return False
        items = schema.get("items", True)
        if not all(_valid(v, True if items == {} else items, root) for v in value):
            return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return False
    return True


def test_the_validator_itself():
    """The validator says no where it should: otherwise the walks below prove nothing."""
    person = SCHEMAS["person"]
    assert _valid(_loads('{"name": "ab", "kind": "a"}'), person, person)
    assert not _valid(_loads('{"name": "ab"}'), person, person)                       # required
    assert not _valid(_loads('{"name": "ab", "kind": "c"}'), person, person)          # enum
    assert not _valid(_loads('{"name": "abcdefghi", "kind": "a"}'), person, person)   # maxLength
    assert not _valid(_loads('{"name": "a", "kind": "a", "zz": 1}'), person, person)  # additional
    assert not _valid(_loads('{"name": "a", "kind": "a", "age": 1.5}'), person, person)  # integer
    assert not _valid(_loads('{"name": "a", "kind": "a", "tags": []}'), person, person)  # minItems
    assert not _valid(_loads('{"name": "a", "name": "b", "kind": "a"}'), person, person)  # repeated
    assert not _valid(_loads('{"name": "a", "kind": true}'), person, person)
    assert _valid(_loads('{"name": "a", "kind": null, "grid": [[1, 2], []]}'), person, person)
    assert not _valid(_loads('{"name": "a", "kind": 1, "grid": [[1, 2, 3]]}'), person, person)
    tree = SCHEMAS["tree"]
    assert _valid(_loads('{"value": 1, "children": [{"value": 2}]}'), tree, tree)
    assert not _valid(_loads('{"value": 1, "children": [{"children": []}]}'), tree, tree)
    assert not _valid(1, {"const": True}, {}) and _valid(1.0, {"enum": [1]}, {})


# --- a hand-made vocabulary ---------------------------------------------------------------------

def _hand_made_tokens() -> list[bytes]:
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b"", b""]  # special tokens (ids 256 and 257): never allowed, the eos below
    punct = ["{", "}", "[", "]", '"', ":", ",", " ", "\n", "\n  ", "  ", "\t"]
    tokens += [(a + b).encode() for a in punct for b in punct]
    words = ['{"', '":', '",', '"}', ' "', '\n  ', '12', '.5', 'true', 'false', 'null', 'tru', 'nul',
             'name', 'abc"', 'abc', '"abc', '\\u00', '\\u00e9', '\\ud83d', '\\n', '\\"', '\\\\', '\\u',
             'é', 'ü"', '日本', '€', '😀', '"é', '"]', '},', '}]', '}}', ']]', '],', '"name":', '"name": "',
             '"age":', '"age": 1', '"kind": "a"', '"tags": ["', '"value":', '"children": [', '"id": 7',
             '{"value": 0', '0', '-0', '-1', '1e', 'E+', 'e-5', '0.0', '123456', '99999999', '3.14',
             '.', '-', '1,', '2]', '3}', '4,"', 'a"', 'b"', 'ab', 'xy', '"x":', '"y"', 'grid', 'ok',
             'score', 'nothing', 'kind', 'tags', 'age', 'id', 'children', 'value', 'extra', '"extra":',
             ', "', '": ', '", "', 'null,', 'true}', 'false]', '""', '"",', '[]', '{}', '[[', '[1',
             '[{', ' {', ' [', ' 1', ' -', ' t', ' n', '\r\n', '   ', '    ', '        ', '\x01', 'a\x1fb',
             '\x7f', 'e\u0301', '\\t', '\\/', '\\b', '\\x', '\\u12', '\\uD8', 'ab\\']
    tokens += [w.encode() for w in words]
    tokens += [b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"\xe0\x80", b"\xed\xa0",
               b"\xf4\x90", b"\xc0\xaf", b"\xc3\xa9\xc3", b"a\xe2", b"\x82\xac\""]
    rng = random.Random(7)
    alphabet = list('{}[]":, \n0123456789.-eEabctrufnlsx\\') + ["é", "日"]
    tokens += ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5))).encode() for _ in range(150)]
    tokens.append(b'"name":')  # a duplicate spelling: both ids must be allowed alike
    return tokens


TOKENS = _hand_made_tokens()
EOS = [256, 257]
WIDTH = len(TOKENS) + 5  # logits wider than the vocabulary: the ids past it are never allowed
HAND = Vocabulary(TOKENS, WIDTH)

SCHEMAS = {
    "any": True,
    "object": {"type": "object"},
    "person": {
        "type": "object", "title": "a person", "$comment": "annotations are read past",
        "properties": {
            "name": {"type": "string", "maxLength": 8, "description": "at most 8 characters"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "nothing": {"type": "null"},
            "kind": {"enum": ["a", "b", 1, None, "é"]},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3},
                     "minItems": 1, "maxItems": 3},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}},
        },
        "required": ["name", "kind"],
    },
    "union": {"anyOf": [
        {"type": "string", "maxLength": 3},
        {"type": "integer"},
        {"type": "object", "properties": {"x": {"const": [1, "y"]}}, "required": ["x"]},
        {"type": ["null", "boolean"]},
    ]},
    "tree": {
        "$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "integer"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["value"]}},
        "$ref": "#/$defs/node",
    },
    "additional": {"type": "object", "properties": {"id": {"type": "integer"}},
                   "additionalProperties": {"type": "string", "minLength": 2}, "required": ["id"]},
    "numbers": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
    "number": {"type": "number"},
    "short_string": {"type": "string", "minLength": 2, "maxLength": 5},
    "one_of": {"oneOf": [{"const": "yes"}, {"const": 12}, {"allOf": [{"type": "array", "maxItems": 1}]}]},
    # Options read alike for a while: states of several stacks (no fast path).
    "overlapping": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "string", "minLength": 4},
                              {"const": "abc"}, {"type": "number"}, {"enum": [1, 12, "ab"]}]},
    "overlapping_objects": {"type": "array", "maxItems": 3, "items": {"anyOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "null"}}}]}},
}


def _brute_force(grammar: JsonGrammar, state) -> set[int]:
    """The tokens whose bytes the grammar takes from `state`, stepped one by one, and the eos
    ids where the value may end or nothing else fits."""
    first: dict[int, frozenset] = {}
    allowed = set()
    for token, spelled in enumerate(grammar.vocabulary.spelled):
        if not spelled:
            continue
        if spelled[0] not in first:
            first[spelled[0]] = grammar.step(state, spelled[0])
        after = first[spelled[0]]
        if after and grammar.advance(after, spelled[1:]):
            allowed.add(token)
    if grammar.accepting(state) or not allowed:
        allowed |= set(grammar.eos_ids)
    return allowed


def _required_names(schema) -> set[bytes]:
    """'"name"' of every required property in the schema: tokens holding one are favoured, so
    that walks through free property names still complete their objects."""
    found = set()
    if isinstance(schema, dict):
        found |= {json.dumps(r).encode() for r in schema.get("required", [])}
        for value in schema.values():
            found |= _required_names(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= _required_names(value)
    return found


def _depth(state) -> int:
    return min(len(stack) for stack in state)


def _walk(grammar: JsonGrammar, rng: random.Random, max_steps: int = 120):
    """A random path through the grammar, each state's mask checked against brute force.
    Returns (bytes written, final state, ended by an eos). Walks are steered to end: tokens that
    close a value (the stack shrinks) and the eos grow likelier the longer a walk goes, tokens
    holding a required property's name are favoured, whitespace is rare."""
    state, written = grammar.initial, b""
    hints = _required_names(grammar.schema.root)
    for steps in range(max_steps):
        mask = grammar.allowed(state)
        assert mask.dtype == torch.bool and mask.shape == (WIDTH,)
        got = set(torch.nonzero(mask).flatten().tolist())
        want = _brute_force(grammar, state)
        assert got == want, (written, sorted(got - want)[:10], sorted(want - got)[:10])
        assert torch.equal(grammar.allowed(state), mask)  # cached alike
        if grammar.closed(state):
            assert got == set(grammar.eos_ids)  # nothing can follow
            return written, state, False
        choices, weights = sorted(got), []
        for token in choices:
            spelled = TOKENS[token]
            if not spelled:
                weights.append(0.1 + steps / 10)
            elif any(hint in spelled for hint in hints):
                weights.append(15.0)
            elif _depth(grammar.advance(state, spelled)) < _depth(state):
                weights.append(0.5 + steps / 6)
            else:
                weights.append(0.3 if spelled.isspace() else 1.0)
        token = rng.choices(choices, weights)[0]
        if token in grammar.eos_ids:
            return written, state, True
        written += TOKENS[token]
        state = grammar.advance(state, TOKENS[token])
        assert state, written
    return written, state, False


WALKS = 20


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_masks_equal_brute_force_along_random_walks(name):
    schema = SCHEMAS[name]
    grammar = HAND.grammar(schema, EOS)
    rng = random.Random(f"walk-{name}")
    complete = 0
    for _ in range(WALKS):
        written, state, by_eos = _walk(grammar, rng)
        if by_eos or grammar.closed(state):
            assert grammar.accepting(state), written
            text = written.decode("utf-8")  # strict: the grammar writes only whole characters
            assert text == text.rstrip() or not text.strip()
            value = _loads(text)
            assert _valid(value, schema, schema), text
            complete += 1
    assert complete >= WALKS // 3, f"only {complete} of {WALKS} walks completed their value"


# --- what the grammar accepts: exactly JSON (for the schema `true`) ------------------------------

def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -0, 7, -12, 10**18, rng.randint(-10**6, 10**6)])
    if kind == 2:
        return rng.choice([0.5, -1.25e-7, 1e300, 3.141592653589793, rng.uniform(-1e6, 1e6)])
    if kind in (3, 4):
        alphabet = ['a', 'Z', ' ', '"', '\\', '/', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', '日', '😀', '\u2028']
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
    if kind in (5, 6):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {_random_value(rng, 4) if rng.random() < 0.5 else f"k{i}": _random_value(rng, depth + 1)
            for i in range(rng.randint(0, 3))}


def _dumps(rng: random.Random, value, ascii: bool | None = None) -> bytes:
    """value as JSON in a random layout (ascii: escaping every non-ASCII character; random where
    None)."""
    indent = rng.choice([None, None, 0, 1, 2, "\t"])
    separators = rng.choice([None, (",", ":"), (" , ", " : ")])
    ascii = rng.random() < 0.5 if ascii is None else ascii
    text = json.dumps(value, ensure_ascii=ascii, indent=indent, separators=separators)
    return (rng.choice(["", " ", "\n  "]) + text).encode()


def _is_json(text: bytes) -> bool:
    """Strict JSON (whole UTF-8, no NaN or Infinity, no lone surrogate escape: every string
    Unicode text), without trailing whitespace."""
    def no_constant(name):
        raise ValueError(name)
    try:
        decoded = text.decode("utf-8")
        json.dumps(json.loads(decoded, parse_constant=no_constant), ensure_ascii=False).encode("utf-8")
    except ValueError:  # (UnicodeError is one)
        return False
    return decoded == decoded.rstrip(" \t\n\r")


def _mutated(rng: random.Random, text: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        byte = bytes([rng.choice(b'{}[]",:0123456789.-+eE \n\\/uatfnl\x00\x1f\x80\xc3\xa9\xff')])
        action = rng.randrange(3)
        if action == 0:
            text = text[:at] + byte + text[at:]
        elif action == 1:
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + byte + text[at + 1:]
    return text


def test_any_value_schema_accepts_exactly_json():
    """For the schema `true` the grammar is JSON itself: it takes what json.dumps writes, in any
    layout, and of random mutations of that exactly what json.loads takes (strictly: no NaN,
    whole UTF-8, no lone surrogate, no trailing whitespace)."""
    grammar = HAND.grammar(True, EOS)
    rng = random.Random(3)
    accepted = refused = 0
    for _ in range(300):
        text = _dumps(rng, _random_value(rng))
        state = grammar.advance(grammar.initial, text)
        assert grammar.accepting(state), text
        number = type(json.loads(text)) in (int, float)
        assert grammar.closed(state) != number, text  # a number may go on; nothing else can
        for _ in range(3):
            bad = _mutated(rng, text)
            state = grammar.advance(grammar.initial, bad)
            assert (bool(state) and grammar.accepting(state)) == _is_json(bad), bad
            accepted += _is_json(bad)
            refused += not _is_json(bad)
    assert accepted > 50 and refused > 300


def _person(rng: random.Random) -> dict:
    value = {"name": rng.choice(["", "Ann", "é日😀\n\"\\", "12345678"]),
             "kind": rng.choice(["a", "b", 1, None, "é"])}
    optional = {"age": rng.randint(-99, 10**9), "score": rng.choice([0, -1.5, 2e-9]), "ok": rng.random() < 0.5,
                "nothing": None, "tags": [rng.choice(["x", "yz", "日本語"]) for _ in range(rng.randint(1, 3))],
                "grid": [[rng.randint(0, 9) for _ in range(rng.randint(0, 2))] for _ in range(rng.randint(0, 3))]}
    for name in rng.sample(sorted(optional), rng.randint(0, len(optional))):
        value[name] = optional[name]
    items = list(value.items())
    rng.shuffle(items)
    return dict(items)


def test_schema_accepts_what_it_describes():
    """Values built to satisfy a schema, in any layout, are accepted; a listed property left out
    (required) or added twice, or one value out of range, is not."""
    schema = SCHEMAS["person"]
    grammar = HAND.grammar(schema, EOS)
    rng = random.Random(5)
    for _ in range(60):
        value = _person(rng)
        assert _valid(value, schema, schema)
        text = _dumps(rng, value, ascii=False)  # (enum values are taken as written compactly)
        state = grammar.advance(grammar.initial, text)
        assert grammar.closed(state), text
        for broken in ({k: v for k, v in value.items() if k != "kind"}, {**value, "name": "123456789"},
                       {**value, "kind": "c"}, {**value, "tags": []}, {**value, "age": 1.5}, {**value, "zz": 1},
                       {**value, "grid": [[1, 2, 3]]}, {**value, "ok": "true"}):
            assert not _valid(broken, schema, schema)
            state = grammar.advance(grammar.initial, _dumps(rng, broken, ascii=False))
            assert not grammar.accepting(state), broken
    tree = SCHEMAS["tree"]
    grammar = HAND.grammar(tree, EOS)
    deep = {"value": 0}
    for i in range(20):
        deep = {"value": i, "children": [deep, {"value": -i}]}
    assert grammar.closed(grammar.advance(grammar.initial, json.dumps(deep, indent=1).encode()))
    assert not grammar.advance(grammar.initial, b'{"value": 1, "children": [{"children": []}]')


# --- single behaviours --------------------------------------------------------------------------

def _after(schema, text) -> tuple[JsonGrammar, frozenset]:
    grammar = HAND.grammar(schema, EOS)
    return grammar, grammar.advance(grammar.initial, text.encode() if isinstance(text, str) else text)


def _takes(schema, text) -> bool:
    """The grammar takes `text` (as a whole value or a prefix of one)."""
    return bool(_after(schema, text)[1])


def _complete(schema, text) -> bool:
    grammar, state = _after(schema, text)
    return bool(state) and grammar.accepting(state)


def _allows(schema, text, token: bytes) -> bool:
    grammar, state = _after(schema, text)
    assert state, text
    return bool(grammar.allowed(state)[TOKENS.index(token)])


PAIR = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]}


def test_an_object_closes_only_once_its_required_properties_are_in():
    assert not _takes(PAIR, '{"a": 1}') and not _allows(PAIR, '{"a": 1', b"}")
    assert not _takes(PAIR, "{}") and not _allows(PAIR, "{", b"}") and not _allows(PAIR, "{", b"{}")
    assert _allows(PAIR, '{"a": 1', b",") and _allows(PAIR, '{"a": 1', b", \"")
    grammar, state = _after(PAIR, '{"b": "", "a": -3}')
    assert grammar.closed(state)
    # With nothing required, an empty object is fine; a trailing comma never is.
    optional = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert _complete(optional, "{ }") and not _takes(optional, '{"a": 1,}') and not _takes(optional, '{,')


def test_names_outside_the_properties_are_refused_unless_additional_properties_allows():
    assert not _takes(PAIR, '{"c') and not _takes(PAIR, '{"ab') and not _takes(PAIR, '{"a": 1, "b": "x", "c"')
    assert not _allows(PAIR, "{", b'"x":') and not _allows(PAIR, "{", b'"name":') and _allows(PAIR, "{", b'"')
    assert _allows(PAIR, '{"', b"a") and not _allows(PAIR, '{"', b"ab") and not _allows(PAIR, "{", b'{"')
    assert not _takes(PAIR, '{"": 1')
    open_pair = {**PAIR, "additionalProperties": True}
    assert _complete(open_pair, '{"a": 1, "b": "x", "c": [null], "ab": {}}')
    typed = {**PAIR, "additionalProperties": {"type": "boolean"}}
    assert _complete(typed, '{"a": 1, "b": "x", "c": true}') and not _takes(typed, '{"c": 1')
    assert _complete(typed, '{"\\u0061": 1, "b": "x"}')  # a listed name escaped is still that name
    assert not _takes(typed, '{"a": 1, "b": "x", "a"')
    # Where properties are given, additionalProperties is false unless it says otherwise.
    assert not _takes({"type": "object", "properties": {"a": {}}}, '{"b"')


def test_a_property_may_not_come_twice():
    assert not _takes(PAIR, '{"a": 1, "a')
    assert not _allows(PAIR, '{"a": 1, "', b"a") and _allows(PAIR, '{"a": 1, "', b"b")
    typed = {**PAIR, "additionalProperties": {"type": "integer"}}
    assert not _takes(typed, '{"a": 1, "a"') and not _takes(typed, '{"b": "", "a": 1, "\\u0062"')
    assert _takes(typed, '{"a": 1, "c": 2, "b"')


def test_enum_and_const_take_their_values_only():
    schema = {"enum": ["red", "green", 3, [1, {"x": None}]]}
    for text in ('"red"', ' "green"', "3", '[1,{"x":null}]'):
        assert _after(schema, text)[0].closed(_after(schema, text)[1]), text
    for text in ('"blue"', '"re"', "4", "30", '"Red"', '[1, {"x":null}]', "null"):
        assert not _complete(schema, text), text
    grammar, state = _after({"enum": [1, 12]}, "1")
    assert grammar.accepting(state) and not grammar.closed(state)
    assert grammar.closed(grammar.step(state, ord("2")))
    assert _complete({"const": "é"}, '"é"') and not _takes({"const": "é"}, '"\\u00e9"')


def test_an_escaped_surrogate_pair_is_one_character_and_a_lone_surrogate_is_refused():
    assert not _complete({"type": "string", "minLength": 2}, '"\\ud83d\\ude00"')
    assert _complete({"type": "string", "maxLength": 1}, '"\\ud83d\\ude00"')
    assert _complete({"type": "string", "minLength": 2}, '"\\uD83D\\uDE00a"')
    for schema in ({"type": "string"}, {"type": "object"}):
        for lone in ('"\\ud83d"', '"\\ud83da', '"\\ud83d\\n', '"\\ud83d\\u0041', '"\\ude00'):
            assert not _takes(schema if schema["type"] == "string" else schema, lone if schema["type"] == "string"
                              else "{" + lone), lone
    assert _complete({"type": "string"}, '"\\ud7ff\\ue000\\u00e9"')


def test_string_lengths_count_characters():
    three = {"type": "string", "maxLength": 3}
    assert _complete(three, '"ééé"') and not _takes(three, '"éééé')
    assert _complete(three, '"日😀a"') and not _takes(three, '"日😀ab')
    assert _complete(three, '"a\\nb"') and not _takes(three, '"a\\nbc')      # an escape is one
    assert _complete(three, '"\\u00e9\\u00e9\\u00e9"') and not _takes(three, '"\\u00e9\\u00e9\\u00e9\\u')
    assert _allows(three, '"éé', "é".encode()) and not _allows(three, '"éé', b"ab")
    assert not _allows(three, '"éé', b'abc"') and _allows(three, '"éé', b'a"')
    assert not _allows(three, '"ééé', b'a"') and _allows(three, '"ééé', b'"')
    assert _allows(three, '"é', b"ab") and _allows(three, '"', b'abc"')
    two = {"type": "string", "minLength": 2}
    assert not _complete(two, '"é"') and _complete(two, '"éé"') and not _complete(two, '"\\n"')
    assert _complete(two, '"\\"\\\\"') and not _allows(two, '"a', b'"')
    assert _complete({"type": "string", "maxLength": 0}, '""') and not _takes({"type": "string", "maxLength": 0}, '"a')


def test_array_lengths():
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
    assert not _takes(schema, "[]") and not _takes(schema, "[1]") and not _takes(schema, "[1, 2, 3,")
    assert _complete(schema, "[1, 2]") and _complete(schema, "[1,2,3]")
    assert not _allows(schema, "[1", b"]") and not _allows(schema, "[1, 2, 3", b",")
    assert _complete({"type": "array", "maxItems": 0}, "[ ]") and not _takes({"type": "array", "maxItems": 0}, "[1")
    assert not _takes({"type": "array"}, "[1,]") and not _takes({"type": "array"}, "[,")


def test_integers_and_numbers():
    integer = {"type": "integer"}
    for text in ("1.", "1e", "1E", "01", "-", "+1", ".5", "1.0"):
        assert not _complete(integer, text), text
    for text in ("0", "-0", "12", "-120"):
        assert _complete(integer, text), text
    number = {"type": "number"}
    for text in ("1.5e-3", "-0.0", "0E+0", "12.25", "9e99"):
        assert _complete(number, text), text
    for text in ("1.", "1.e5", "00", "-01", "1e", "1e+", ".5", "+1", "1.5.2", "0x10", "Infinity", "NaN"):
        assert not _complete(number, text), text


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 9}, {"type": "object"},
                                    {"type": "object", "properties": {"a": {}}, "additionalProperties": True}],
                         ids=["free", "counted", "any-name", "listed-or-other"])
def test_strings_take_only_whole_utf8_and_no_control_bytes(schema):
    start = '"' if schema["type"] == "string" else '{"'
    for bad in (b"\xe0\x80", b"\xed\xa0", b"\xf4\x90", b"\x80", b"\xc0\xaf", b"\xc1", b"\xf5", b"\xff",
                b"\xc3\x28", b"\x00", b"\x01", b"\n", b"\x1f", b"\\x", b"\\u12g", b"\\U0041", b'\\ud800"'):
        assert not _takes(schema, start.encode() + bad), bad
    for good in (b"\xc3\xa9", b"\xe0\xa0\x80", b"\xed\x9f\xbf", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\x7f",
                 b"\\ud800\\udc00", b"\\/\\b\\f\\r\\t"):
        assert _takes(schema, start.encode() + good + b'"'), good
    # A token holding a character's lead bytes is allowed; then only the rest of it is.
    for lead, rest in ((b"\xc3", b"\xa9"), (b"\xe2\x82", b"\xac"), (b"\xf0\x9f", b"\x98\x80")):
        assert _allows(schema, start, lead)
        after = start.encode() + lead
        assert _allows(schema, after, rest) and not _allows(schema, after, b'"') and not _allows(schema, after, b"a")


def test_whitespace_runs_are_bounded():
    assert _complete(True, " " * MAX_WHITESPACE + "1") and not _takes(True, " " * (MAX_WHITESPACE + 1))
    assert _takes(True, "{" + "\n" * MAX_WHITESPACE + "}") and not _takes(True, "{" + "\n" * (MAX_WHITESPACE + 1))
    assert _takes(True, "[1" + "\t" * MAX_WHITESPACE + "]") and not _takes(True, "[1" + "\t" * (MAX_WHITESPACE + 1))
    assert _takes(True, '{"a"' + " " * MAX_WHITESPACE + ":" + " " * MAX_WHITESPACE + "1")
    assert not _takes(True, '{"a":' + " " * (MAX_WHITESPACE + 1))
    # Runs apart may each be long.
    assert _complete(True, "[" + (" " * MAX_WHITESPACE + "1" + " " * MAX_WHITESPACE + ",") * 3 + "0]")


def test_numbers_are_bounded():
    assert _complete(True, "1" * MAX_NUMBER_BYTES) and not _takes(True, "1" * (MAX_NUMBER_BYTES + 1))
    assert _complete(True, "[" + "2" * MAX_NUMBER_BYTES + "]") and not _takes(True, "[" + "2" * (MAX_NUMBER_BYTES + 1))
    long = "-1." + "5" * (MAX_NUMBER_BYTES - 6) + "e+1"
    assert len(long) == MAX_NUMBER_BYTES and _complete({"type": "number"}, long)
    assert not _takes({"type": "number"}, long + "0")


def test_free_property_names_beside_listed_ones_are_bounded():
    """A name that may be a listed one or another is remembered whole, up to MAX_KEY_BYTES; the
    mask near the bound agrees with brute force (the fast path counts the tokens' bytes)."""
    schema = SCHEMAS["additional"]
    name = "k" * MAX_KEY_BYTES
    assert _complete(schema, '{"' + name + '": "ab", "id": 1}')
    assert not _takes(schema, '{"' + name + "k") and not _takes(schema, '{"' + name[:-1] + "é")
    grammar, state = _after(schema, '{"' + "k" * (MAX_KEY_BYTES - 3))
    mask = grammar.allowed(state)
    assert set(torch.nonzero(mask).flatten().tolist()) == _brute_force(grammar, state)
    assert mask[TOKENS.index(b"abc")] and mask[TOKENS.index(b"abc\"")] and not mask[TOKENS.index(b"name")]
    # A name without listed ones is not remembered: any length.
    assert _complete({"type": "object"}, '{"' + "k" * (4 * MAX_KEY_BYTES) + '": 1}')


def test_depth_is_bounded():
    assert _takes(True, "[" * MAX_DEPTH) and not _takes(True, "[" * (MAX_DEPTH + 1))
    grammar, state = _after(True, "[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert grammar.closed(state)
    grammar, state = _after(True, "[" * MAX_DEPTH)
    # A value at the limit can be a word only: strings and numbers are frames too.
    mask = grammar.allowed(state)
    assert mask[TOKENS.index(b"]")] and mask[TOKENS.index(b"true")] and mask[TOKENS.index(b"nul")]
    assert not mask[TOKENS.index(b"[")] and not mask[TOKENS.index(b"{")] and not mask[TOKENS.index(b"1")]
    assert not mask[TOKENS.index(b'"')]


def test_nothing_trails_the_value():
    for text in ("{}", '"a"', "true", "null", "[1]", '{"a":[]}'):
        grammar, state = _after(True, text)
        assert grammar.closed(state), text
        mask = grammar.allowed(state)
        assert set(torch.nonzero(mask).flatten().tolist()) == set(EOS), text
        for after in (" ", "\n", ",", "1", "}"):
            assert not grammar.advance(state, after.encode()), (text, after)


def test_a_top_level_number_may_end_or_go_on():
    grammar, state = _after({"type": "number"}, "12")
    assert grammar.accepting(state) and not grammar.closed(state)
    mask = grammar.allowed(state)
    assert all(mask[EOS]) and mask[TOKENS.index(b"3")] and mask[TOKENS.index(b".5")] and mask[TOKENS.index(b"e-5")]
    assert not mask[TOKENS.index(b" ")] and not mask[TOKENS.index(b",")]
    grammar, state = _after({"type": "number"}, "12.")
    assert state and not grammar.accepting(state) and not any(grammar.allowed(state)[EOS])
    grammar, state = _after({"type": "object"}, "{}")
    assert grammar.closed(state) and grammar.accepting(state)
    grammar, state = _after({"type": "object"}, "{")
    assert not grammar.accepting(state) and not any(grammar.allowed(state)[EOS])


def test_special_tokens_and_ids_past_the_vocabulary_are_never_allowed():
    grammar = HAND.grammar(True, EOS)
    for text in ("", '"', "[", "12", '{"a":'):
        mask = grammar.allowed(grammar.advance(grammar.initial, text.encode()))
        assert not mask[len(TOKENS):].any()
        assert bool(mask[EOS].any()) == grammar.accepting(grammar.advance(grammar.initial, text.encode()))
    # Both spellings of a duplicated token are allowed alike.
    first, second = TOKENS.index(b'"name":'), len(TOKENS) - 1
    assert TOKENS[second] == b'"name":'
    grammar, state = _after({"type": "object"}, "{")
    assert grammar.allowed(state)[first] and grammar.allowed(state)[second]


def test_where_no_token_fits_the_request_cannot_go_on():
    """Where no token fits (a vocabulary that cannot spell what the schema needs), a
    JsonConstraintError: ending with the end-of-sequence token would return invalid JSON."""
    vocabulary = Vocabulary([b"a", b"b", b"", b"{"], 6)
    grammar = vocabulary.grammar({"type": "object", "properties": {"x": {}}, "required": ["x"]}, [2])
    assert grammar.allowed(grammar.initial).tolist() == [False, False, False, True, False, False]
    state = grammar.advance(grammar.initial, b"{")
    with pytest.raises(JsonConstraintError, match="no token can continue"):
        grammar.allowed(state)


def test_an_end_of_sequence_token_with_text_is_allowed_only_where_the_value_may_end():
    vocabulary = Vocabulary([b"{", b"}", b'"a"', b":", b"1", b"</s>"], 6)
    grammar = vocabulary.grammar({"type": "object"}, [5])
    assert not grammar.allowed(grammar.initial)[5]
    state = grammar.advance(grammar.initial, b'{"a":')
    assert not grammar.allowed(state)[5]
    number = vocabulary.grammar({"type": "integer"}, [5])
    assert number.allowed(number.advance(number.initial, b"1"))[5]


def test_listed_names_may_hold_quotes_and_backslashes():
    schema = {"type": "object", "properties": {'a"b': {"type": "integer"}, "c\\d": {"type": "null"},
                                               "a": {"type": "null"}}}
    assert _complete(schema, '{"a\\"b": 1, "c\\\\d": null, "a": null}')
    assert not _takes(schema, '{"a\\"x') and not _takes(schema, '{"a\\\\')
    grammar, state = _after(schema, '{"a\\')  # every mask walk from here must not raise
    assert grammar.allowed(state).any()
    grammar, state = _after(schema, '{"c')
    assert grammar.allowed(state).any()


def test_readings_of_the_output_are_bounded():
    # Copies of one option share a node, so this stays one reading however deep it goes...
    copies = {"$defs": {"x": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}},
                                        {"type": "array", "items": {"$ref": "#/$defs/x"}}]}},
              "$ref": "#/$defs/x"}
    grammar, state = _after(copies, "[" * 40)
    assert len(state) == 1 and grammar.allowed(state).any()
    # ... and options that really differ but begin alike fail the request once they multiply.
    alike = {"$defs": {"x": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}},
                                       {"type": "array", "items": {"$ref": "#/$defs/x"}, "maxItems": 5}]}},
             "$ref": "#/$defs/x"}
    with pytest.raises(JsonConstraintError, match="readings"):
        _after(alike, "[" * 40)


def test_strings_in_every_reading_keep_the_fast_path():
    two = {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "string", "minLength": 5}]}
    grammar, state = _after(two, '"ab')
    assert len(state) == 2 and grammar._inside_free_string(state) is not None
    assert _complete(two, '"abc"') and _complete(two, '"abcdef"') and not _complete(two, '"abcd"')


def test_huge_length_bounds_are_no_bounds():
    for bound in (2**31, 2**32 + 1, 2**63, 2**70):
        schema = {"type": "string", "maxLength": bound}
        grammar, state = _after(schema, '"ab')
        assert grammar.allowed(state).sum() > 100, bound


def test_matcher_follows_tokens():
    ids = {spelled: TOKENS.index(spelled) for spelled in (b'{"', b"name", b'":', b' "', b"abc", b'"}', b"12")}
    matcher = JsonMatcher(HAND.grammar(SCHEMAS["person"], EOS))
    for spelled in (b'{"', b"name", b'":', b' "', b"abc"):
        assert matcher.allowed()[ids[spelled]]
        matcher.advance(ids[spelled])
        assert not matcher.closed and not matcher.accepting
    assert not matcher.allowed()[ids[b'"}']]  # kind is required
    matcher.advance(TOKENS.index(b'",'))
    for spelled in (b'"kind": "a"', b"}"):
        matcher.advance(TOKENS.index(spelled))
    assert matcher.closed and matcher.accepting
    assert set(torch.nonzero(matcher.allowed()).flatten().tolist()) == set(EOS)
    number = JsonMatcher(HAND.grammar({"type": "number"}, EOS))
    number.advance(ids[b"12"])
    assert number.accepting and not number.closed
    number.advance(TOKENS.index(b"."))
    assert not number.accepting and number.state
    number.advance(TOKENS.index(b"}"))
    assert not number.state


def test_grammars_are_shared_per_schema_and_eos():
    assert HAND.grammar({"type": "object"}, EOS) is HAND.grammar({"type": "object"}, list(reversed(EOS)))
    assert HAND.grammar({"type": "object"}, EOS) is not HAND.grammar({"type": "object"}, EOS[:1])
    assert HAND.grammar({"type": "object"}, EOS) is not HAND.grammar({"type": "array"}, EOS)


# --- schemas refused ----------------------------------------------------------------------------

REFUSED = {
    "pattern": {"type": "string", "pattern": "^a$"},
    "minimum": {"type": "integer", "minimum": 0},
    "format": {"type": "string", "format": "date"},
    "nested unsupported keyword": {"type": "object", "properties": {"a": {"type": "string", "format": "email"}}},
    "false": False,
    "false property": {"type": "object", "properties": {"a": False}},
    "required not in properties": {"type": "object", "properties": {"a": {}}, "required": ["b"]},
    "required without properties": {"type": "object", "required": ["b"]},
    "required not a list": {"type": "object", "properties": {"a": {}}, "required": "a"},
    "$ref to nothing": {"$ref": "#/$defs/missing"},
    "$ref outside": {"$ref": "https://example.com/schema.json"},
    "$ref beside type": {"$defs": {"a": {}}, "$ref": "#/$defs/a", "type": "object"},
    "allOf of two": {"allOf": [{"type": "object"}, {"type": "object"}]},
    "anyOf empty": {"anyOf": []},
    "anyOf beside type": {"anyOf": [{"type": "string"}], "type": "string"},
    "empty enum": {"enum": []},
    "enum not a list": {"enum": "a"},
    "maxItems < minItems": {"type": "array", "minItems": 3, "maxItems": 2},
    "negative minLength": {"type": "string", "minLength": -1},
    "bool maxLength": {"type": "string", "maxLength": True},
    "float maxItems": {"type": "array", "maxItems": 2.5},
    "NaN const": {"const": float("nan")},
    "infinite enum": {"enum": [1, float("inf")]},
    "number": 5,
    "string": "object",
    "list": [{"type": "object"}],
    "null": None,
    "type foo": {"type": "foo"},
    "type list with foo": {"type": ["string", "foo"]},
    "empty type list": {"type": []},
    "properties not an object": {"type": "object", "properties": ["a"]},
    "items a list": {"type": "array", "items": [{"type": "string"}]},
    "additionalProperties a number": {"type": "object", "additionalProperties": 1},
    "lone surrogate name": {"type": "object", "properties": {"\ud800": {}}},
    "object type beside const": {"const": 1, "type": {}},
    "nested list type beside enum": {"enum": [1], "type": [["x"]]},
    "array index past the end": {"anyOf": [{"type": "null"}], "items": {"$ref": "#/anyOf/1"}},
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_or_malformed_schemas_are_refused(name):
    schema = REFUSED[name]
    if schema is None:  # None means "no schema" to SamplingParams; check_schema refuses it
        with pytest.raises(UserError, match="^invalid json_schema:"):
            check_schema(schema)
        return
    with pytest.raises(UserError, match="^invalid json_schema:"):
        check_schema(schema)
    with pytest.raises(UserError, match="invalid json_schema:"):
        SamplingParams(json_schema=schema)


@pytest.mark.parametrize("schema", [
    True, {}, {"type": "object"}, {"title": "anything", "description": "x", "examples": [1], "deprecated": False},
    {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "type": "string", "default": "a",
     "readOnly": True, "writeOnly": False, "$comment": "c", "definitions": {"unused": {"pattern": "x"}}},
    {"allOf": [{"type": "integer"}]}, {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    {"type": ["string", "null"], "maxLength": 2},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "integer"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"a~b/c": {"type": "integer"}, "d": {"$ref": "#/properties/a~0b~1c"}}},
    SCHEMAS["tree"], SCHEMAS["person"],
], ids=lambda s: json.dumps(s)[:40])
def test_supported_schemas_are_taken(schema):
    assert check_schema(schema) is schema
    assert SamplingParams(json_schema=schema).json_schema == schema


def test_escaped_ref_paths_resolve():
    schema = {"type": "object", "properties": {"a~b/c": {"type": "integer"}, "d": {"$ref": "#/properties/a~0b~1c"}}}
    assert _complete(schema, '{"d": 5}') and not _takes(schema, '{"d": "')


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"anyOf": [{"type": "null"}, {"$ref": "#"}]},
                                    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                                     "$ref": "#/$defs/a"}], ids=["self", "in-anyOf", "pair"])
def test_a_ref_cycle_without_a_value_is_refused(schema):
    """Choosing such a schema's first byte would never end (it once recursed until Python gave up)."""
    with pytest.raises(UserError, match="^invalid json_schema:"):
        check_schema(schema)


def test_recursion_through_a_value_is_fine():
    schema = {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#"}}]}
    assert check_schema(schema) is schema
    assert _complete(schema, "[1, [2, []], [[[3]]]]") and not _takes(schema, '["')


@pytest.mark.parametrize("schema", [{"type": "string", "minLength": None},
                                    {"type": "string", "minLength": None, "maxLength": 3},
                                    {"type": "array", "minItems": None}], ids=["minLength", "with-max", "minItems"])
def test_null_bounds_are_refused(schema):
    with pytest.raises(UserError, match="^invalid json_schema:"):
        check_schema(schema)


@pytest.mark.parametrize("schema, text", [({"type": "string", "enum": ["a", 1]}, "1"),
                                          ({"enum": ["abc", "d"], "maxLength": 2}, '"abc"'),
                                          ({"type": "integer", "const": 1.5}, "1.5")],
                         ids=["type", "maxLength", "const"])
def test_enum_and_const_keep_the_keywords_beside_them(schema, text):
    assert not _valid(json.loads(text), schema, schema)
    try:
        check_schema(schema)
    except UserError:
        return  # refusing the combination is fine too
    assert not _complete(schema, text)


def test_ignore_eos_cannot_go_with_a_schema():
    with pytest.raises(UserError, match="ignore_eos"):
        SamplingParams(json_schema={"type": "object"}, ignore_eos=True)
    SamplingParams(json_schema={"type": "object"})
    SamplingParams(ignore_eos=True)


# --- through the engine, on a tiny random model -------------------------------------------------
# A random model writes JSON only where the mask makes it: every finished completion must parse.

ENGINE_SCHEMAS = {
    "object": {"type": "object"},
    "record": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"]},
    "union": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                                               "maxItems": 4}]},
    "tree": SCHEMAS["tree"],
    "enum": {"enum": ["alpha", "beta", 42, None]},
    "string": {"type": "string", "minLength": 3, "maxLength": 10},
}
SAMPLING = {
    "greedy": dict(temperature=0),
    "seed1": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1),
    "seed2": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=2),
    "default-filters": dict(temperature=0.8, seed=3),  # top_k 40, top_p 0.95, min_p 0.05 over -inf rows
}
MAX_TOKENS = 48
PROMPT = "Answer in JSON: the model reads"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    pytest.importorskip("transformers")  # (the tiny models are built with it)
    from tests.fixtures import tiny_model_dir

    return {kind: tiny_model_dir(tmp_path_factory.mktemp(kind), seed=11, tokenizer=kind)
            for kind in ("bpe", "sentencepiece")}


@pytest.fixture(scope="module")
def llms(model_dirs):
    from lisa_rt.llm import LLM

    made = {kind: LLM(str(path), device="cpu", dtype="float32", kv_cache_gb=0.05, max_num_seqs=32)
            for kind, path in model_dirs.items()}
    yield made
    for llm in made.values():
        llm.close()


def _replay(llm, completion, schema, max_tokens: int = MAX_TOKENS) -> JsonGrammar:
    """Checks a completion against its schema as the engine saw it: every token allowed where it
    came, its bytes the text; a "stop" is a whole value that satisfies the schema, a "length" a
    prefix of one cut at max_tokens."""
    tok = llm.tokenizer
    vocabulary = vocabulary_of(tok, llm.model.config.vocab_size)
    grammar = vocabulary.grammar(schema, tok.eos_token_ids)
    state = grammar.initial
    for i, token in enumerate(completion.token_ids):
        assert grammar.allowed(state)[token], (completion.text, i)
        state = grammar.advance(state, vocabulary.spelled[token])
        assert state, (completion.text, i)
    written = b"".join(vocabulary.spelled[t] for t in completion.token_ids)
    if completion.finish_reason == "stop":
        assert grammar.accepting(state), completion.text
        assert written.decode("utf-8") == completion.text
        value = _loads(completion.text)
        assert _valid(value, schema, schema), completion.text
    else:
        assert completion.finish_reason == "length", completion.finish_reason
        assert len(completion.token_ids) == max_tokens
        assert written.decode("utf-8", errors="replace") == completion.text
    return grammar


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_generated_text_follows_the_schema(llms, kind):
    llm = llms[kind]
    cases = [(name, how) for name in ENGINE_SCHEMAS for how in SAMPLING]
    params = [SamplingParams(max_tokens=MAX_TOKENS, json_schema=ENGINE_SCHEMAS[name], **SAMPLING[how])
              for name, how in cases]
    out = llm.generate([PROMPT] * len(cases), params)
    stopped = 0
    for (name, how), completion in zip(cases, out):
        _replay(llm, completion, ENGINE_SCHEMAS[name])
        stopped += completion.finish_reason == "stop"
    assert stopped >= len(cases) // 3, [(c, o.finish_reason, o.text) for c, o in zip(cases, out)]
    by_case = dict(zip(cases, out))
    for how in SAMPLING:  # these end within a few tokens whatever is drawn
        assert by_case["enum", how].finish_reason == "stop"
        assert json.loads(by_case["enum", how].text) in ("alpha", "beta", 42, None)
    # The seeds drew differently somewhere (the sampled rows were sampled).
    assert any(by_case[name, "seed1"].token_ids != by_case[name, "seed2"].token_ids for name in ENGINE_SCHEMAS)


def test_the_constraint_changes_what_a_random_model_writes(llms):
    llm = llms["bpe"]
    free = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)  # a random model does not write JSON by itself
    for schema in (ENGINE_SCHEMAS["enum"], {"type": "boolean"}, {"const": {"a": [1, "é"]}}):
        constrained = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                          json_schema=schema))[0]
        assert constrained.finish_reason == "stop", constrained.text
        assert _valid(json.loads(constrained.text), schema, schema)
        assert constrained.token_ids != free.token_ids[:len(constrained.token_ids)]
    assert json.loads(llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema={
        "const": {"a": [1, "é"]}}))[0].text) == {"a": [1, "é"]}
    # A logit bias or a penalty cannot lift a token the schema does not allow.
    favourite = free.token_ids[0]
    for extra in (dict(logit_bias={favourite: 100.0}), dict(repetition_penalty=1.5, presence_penalty=-2.0)):
        out = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                  json_schema=ENGINE_SCHEMAS["enum"], **extra))[0]
        assert out.finish_reason == "stop" and json.loads(out.text) in ("alpha", "beta", 42, None), out.text
    biased = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, logit_bias={favourite: 100.0}))[0]
    assert set(biased.token_ids) == {favourite}  # (the bias is strong enough to win where it may)


def test_a_closed_value_ends_the_sequence_at_once(llms):
    """Nothing can follow a closed value: the sequence stops on its last token (no eos needed),
    so a value that fills max_tokens exactly is a "stop", not a "length"."""
    llm = llms["bpe"]
    for schema in (ENGINE_SCHEMAS["enum"], ENGINE_SCHEMAS["string"], {"type": "array", "items": {"type": "null"}}):
        first = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema=schema))[0]
        assert first.finish_reason == "stop", first.text
        exact = llm.generate(PROMPT, SamplingParams(max_tokens=len(first.token_ids), temperature=0,
                                                    json_schema=schema, logprobs=0))[0]
        assert (exact.token_ids, exact.finish_reason) == (first.token_ids, "stop")
        assert len(exact.logprobs) == len(exact.token_ids)  # no eos was drawn


def test_a_request_whose_schema_cannot_go_on_fails_alone(llms, monkeypatch):
    """A JsonConstraintError (too many readings, no token that fits) fails its own request
    with that error; the requests batched with it go on as they would alone."""
    llm = llms["bpe"]
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate(PROMPT, free)[0].token_ids
    real_allowed = JsonMatcher.allowed

    def allowed(self):
        if self.grammar.schema.root.get("title") == "stuck" and self.state != self.grammar.initial:
            raise JsonConstraintError("no token can continue the JSON value here (a test)")
        return real_allowed(self)

    monkeypatch.setattr(JsonMatcher, "allowed", allowed)
    stuck = llm.submit(PROMPT, SamplingParams(max_tokens=12, temperature=0,
                                              json_schema={"title": "stuck", "type": "array"}))
    other = llm.submit(PROMPT, free)
    with pytest.raises(JsonConstraintError, match="a test"):
        stuck.result(timeout=60)
    assert other.result(timeout=60).token_ids == alone


def test_the_mask_stays_on_its_own_row(llms):
    """An unconstrained request batched beside constrained ones gets the tokens it gets alone,
    greedy or seeded."""
    llm = llms["bpe"]
    free = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, ignore_eos=True)]
    alone = [llm.generate(PROMPT, sp)[0].token_ids for sp in free]
    constrained = [SamplingParams(max_tokens=24, temperature=0, json_schema={"type": "object"}),
                   SamplingParams(max_tokens=24, temperature=1.0, seed=6, json_schema=ENGINE_SCHEMAS["record"])]
    out = llm.generate([PROMPT] * 4, [constrained[0], free[0], constrained[1], free[1]])
    assert [out[1].token_ids, out[3].token_ids] == alone
    assert out[0].token_ids == llm.generate(PROMPT, constrained[0])[0].token_ids
    for completion, sp in ((out[0], constrained[0]), (out[2], constrained[1])):
        _replay(llm, completion, sp.json_schema, sp.max_tokens)


def test_preemption_and_overlap_keep_the_constraint(model_dirs):
    """A sequence preempted (its cache recomputed) keeps its place in the grammar; forced overlap
    (unconstrained rows) beside constrained ones changes no token."""
    import lisa_rt
    from lisa_rt.engine import Engine, run_to_completion
    from lisa_rt.kv_cache import KVCache

    model = lisa_rt.load_model(model_dirs["bpe"], device="cpu", dtype="float32")
    prompt = model.tokenizer.encode(PROMPT)
    params = [SamplingParams(max_tokens=40, temperature=t, seed=i, json_schema=s)
              for i, (t, s) in enumerate([(0, ENGINE_SCHEMAS["record"]), (1.0, ENGINE_SCHEMAS["tree"]),
                                          (0, {"type": "array"}), (1.0, {"type": "object"})])]
    params += [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)]
    want = lisa_rt.generate(model, [prompt] * len(params), params, overlap=False)
    got = lisa_rt.generate(model, [prompt] * len(params), params, overlap=True)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    # A cache of 6 blocks of 16 tokens: the five cannot all stay.
    engine = Engine(model, KVCache(model.config, 6, "cpu", model.dtype), max_num_seqs=8)
    out = run_to_completion(engine, [prompt] * len(params), params)
    assert engine.stats()["preemptions"] > 0
    assert [c.token_ids for c in out] == [c.token_ids for c in want]
    for completion, sp in zip(out[:4], params):
        if completion.finish_reason == "stop":
            assert _valid(_loads(completion.text), sp.json_schema, sp.json_schema)


def test_a_model_without_a_tokenizer_refuses_a_schema(model_dirs):
    import lisa_rt
    from lisa_rt.engine import check_prompt

    model = lisa_rt.load_model(model_dirs["bpe"], device="cpu", dtype="float32")
    model.tokenizer = None
    with pytest.raises(UserError, match="tokenizer"):
        check_prompt(model, [1, 2, 3], SamplingParams(json_schema={"type": "object"}))
    check_prompt(model, [1, 2, 3], SamplingParams())


def test_ignore_eos_with_a_schema_is_refused_by_the_llm(llms):
    with pytest.raises(UserError, match="ignore_eos"):
        llms["bpe"].generate(PROMPT, SamplingParams(json_schema=True, ignore_eos=True))


# --- the server's response_format ---------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def server(llms):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from tests.test_server import LiveServer

    class PostingServer(LiveServer):
        def post(self, path: str, body: dict):
            return httpx.post(self.url + path, json=body, timeout=120)

    live = PostingServer(llms["bpe"])
    yield live
    live.stop()


def _json_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}


def _request(path: str, **extra) -> dict:
    if path == CHAT:
        return {"model": "tiny", "messages": [{"role": "user", "content": "Reply in JSON."}], **extra}
    return {"model": "tiny", "prompt": PROMPT, **extra}


def _texts(response) -> list[tuple[str, str]]:
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    return [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]) for c in choices]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_response_format_json_schema(server, path):
    schema = ENGINE_SCHEMAS["enum"]
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=4, n=3)):
        response = server.post(path, _request(path, max_tokens=MAX_TOKENS, response_format=_json_format(schema),
                                              **sampling))
        for text, finish in _texts(response):
            assert finish == "stop" and json.loads(text) in ("alpha", "beta", 42, None), text
    record = ENGINE_SCHEMAS["record"]
    response = server.post(path, _request(path, max_tokens=MAX_TOKENS, temperature=1.0, seed=9, n=4,
                                          response_format=_json_format(record)))
    for text, finish in _texts(response):
        if finish == "stop":
            assert _valid(_loads(text), record, record), text
        else:
            assert finish == "length" and text.lstrip().startswith("{"), text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_response_format_json_object(server, path):
    body = _request(path, max_tokens=MAX_TOKENS, temperature=1.0, seed=1, n=6,
                    response_format={"type": "json_object"})
    results = _texts(server.post(path, body))
    for text, finish in results:
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert finish == "length" and text.lstrip().startswith("{"), text
    # Free text is still free: {"type": "text"} or no response_format at all.
    plain = _texts(server.post(path, _request(path, max_tokens=16, temperature=0)))
    assert _texts(server.post(path, _request(path, max_tokens=16, temperature=0,
                                             response_format={"type": "text"}))) == plain
    constrained = _texts(server.post(path, _request(path, max_tokens=16, temperature=0,
                                                   response_format={"type": "json_object"})))
    assert constrained != plain and constrained[0][0].lstrip().startswith("{")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_response_format_streamed_equals_whole(server, path):
    import httpx

    body = _request(path, max_tokens=MAX_TOKENS, temperature=0, response_format=_json_format(ENGINE_SCHEMAS["tree"]))
    (whole, finish), = _texts(server.post(path, body))
    pieces, finishes = [], []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
                    finishes.append(choice.get("finish_reason"))
    assert "".join(pieces) == whole and finishes[-1] == finish
    if finish == "stop":
        assert _valid(_loads(whole), ENGINE_SCHEMAS["tree"], ENGINE_SCHEMAS["tree"])


BAD_FORMATS = {
    "a string": "json_object",
    "a list": [{"type": "json_object"}],
    "no type": {"json_schema": {"schema": {}}},
    "unknown type": {"type": "xml"},
    "json_schema missing": {"type": "json_schema"},
    "json_schema not an object": {"type": "json_schema", "json_schema": "answer"},
    "schema missing": {"type": "json_schema", "json_schema": {"name": "answer"}},
    "unsupported keyword": _json_format({"type": "string", "pattern": "^a+$"}),
    "required outside properties": _json_format({"type": "object", "properties": {}, "required": ["a"]}),
    "false schema": _json_format(False),
}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("name", list(BAD_FORMATS))
def test_bad_response_format_is_400(server, path, name):
    response = server.post(path, _request(path, max_tokens=4, response_format=BAD_FORMATS[name]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format", error
    assert error["type"] == "invalid_request_error" and error["message"]
    if name in ("unsupported keyword", "required outside properties", "false schema"):
        assert "invalid json_schema" in error["message"]


# --- the command line's --json-schema -----------------------------------------------------------

@pytest.fixture
def run(capsys):
    """In-process, as test_cli runs it: run(*argv, stdin=bytes) -> (exit code, stdout, stderr)."""
    import io
    import sys

    from lisa_rt import cli

    def run(*argv, stdin: bytes | None = None):
        saved = sys.stdin
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        try:
            capsys.readouterr()
            rc = cli.main([str(a) for a in argv])
            out, err = capsys.readouterr()
        finally:
            sys.stdin = saved
        return rc, out, err
    return run


def _generate(model_dir, *extra):
    return ("generate", "-m", model_dir, "-p", PROMPT, "--temp", 0, "-n", 40, *extra)


def test_cli_json_schema_inline_and_from_a_file(run, model_dirs, tmp_path):
    model_dir = model_dirs["bpe"]
    rc, out, err = run(*_generate(model_dir, "--json-schema", '{"type": "object"}', "--json"))
    assert rc == 0 and err == "", err
    result = json.loads(out)
    if result["finish_reason"] == "stop":
        assert isinstance(json.loads(result["text"]), dict)
    else:
        assert result["completion_tokens"] == 40 and result["text"].lstrip().startswith("{")
    rc, streamed, err = run(*_generate(model_dir, "--json-schema", '{"type": "object"}'))
    assert rc == 0 and streamed == result["text"] + "\n"
    # A file: its schema's value, printed as the model wrote it.
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(ENGINE_SCHEMAS["enum"]), encoding="utf-8")
    rc, out, err = run(*_generate(model_dir, "--json-schema", path))
    assert rc == 0 and err == "", err
    assert json.loads(out.strip()) in ("alpha", "beta", 42, None)
    # Leading whitespace inline is still inline.
    rc, again, _ = run(*_generate(model_dir, "--json-schema", "  " + json.dumps(ENGINE_SCHEMAS["enum"])))
    assert rc == 0 and again == out
    # chat takes it too.
    rc, out, err = run("chat", "-m", model_dir, "-n", 40, "--temp", 0, "--json-schema", path, stdin=b"hello\n")
    assert rc == 0 and "Traceback" not in err
    assert json.loads(out.strip()) in ("alpha", "beta", 42, None)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_bad_json_schema_is_one_error_line(run, model_dirs, tmp_path, command):
    from tests.test_cli import assert_user_error

    model_dir = model_dirs["bpe"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"type": ', encoding="utf-8")
    latin = tmp_path / "latin1.json"
    latin.write_bytes('{"description": "café"}'.encode("latin-1"))
    cases = [
        (str(tmp_path / "missing.json"), ["missing.json"]),
        (str(bad_json), ["not valid JSON"]),
        (str(latin), ["latin1.json", "UTF-8"]),
        ('{"type": ', ["not valid JSON"]),
        ('{"type": "string", "pattern": "a"}', ["invalid json_schema", "pattern"]),
        ('{"type": "foo"}', ["invalid json_schema"]),
        ('{"const": NaN}', []),
    ]
    for schema, fragments in cases:
        argv = (_generate(model_dir, "--json-schema", schema) if command == "generate"
                else ("chat", "-m", model_dir, "--json-schema", schema))
        assert_user_error(*run(*argv, stdin=b"hello\n"), *fragments)


def test_the_mask_cache_keeps_to_its_byte_budget():
    from lisa_rt.json_constraint import _MaskCache

    cache = _MaskCache(budget=3 * 100)
    for i in range(5):
        cache.put(("g", i), torch.zeros(100, dtype=torch.bool))
    assert cache.used == 300 and cache.get(("g", 0)) is None and cache.get(("g", 4)) is not None
    cache.get(("g", 2))                      # used: now the last to go
    cache.put(("g", 5), torch.zeros(100, dtype=torch.bool))
    assert cache.get(("g", 3)) is None and cache.get(("g", 2)) is not None


def test_a_token_that_would_multiply_the_readings_is_left_out_not_fatal():
    schema = {"anyOf": [{"type": "array", "items": {"$ref": "#"}},
                        {"type": "array", "items": {"$ref": "#"}, "maxItems": 5}, {"type": "integer"}]}
    vocabulary = Vocabulary([bytes([b]) for b in range(256)] + [b"[" * 8], 258)
    grammar = vocabulary.grammar(schema, [257])
    mask = grammar.allowed(grammar.initial)
    assert mask[ord("[")] and not mask[256]
    assert grammar.closed(grammar.advance(grammar.initial, b"[[1]]"))


def test_json_pointers():
    defs = {"": {"x": {"type": "integer"}}, "x": {"type": "string"}}
    assert _complete({"$defs": defs, "$ref": "#/$defs//x"}, "1")
    assert not _takes({"$defs": defs, "$ref": "#/$defs//x"}, '"')
    assert _complete({"anyOf": [{"type": "null"}, {"$ref": "#/anyOf/0"}]}, "null")
    for bad in ("#/anyOf/²", "#/anyOf/" + "1" * 5000, "#/anyOf/01", "#foo"):
        with pytest.raises(UserError, match="^invalid json_schema:"):
            check_schema({"anyOf": [{"type": "string"}, {"$ref": bad}]})
    assert _complete({"$defs": {"a b": {"type": "null"}}, "$ref": "#/$defs/a%20b"}, "null")


def test_equal_subschemas_compile_once():
    from lisa_rt.json_constraint import SchemaNodes

    big = {"enum": [f"value {i}" for i in range(200)]}
    wrappers = {"$defs": {"big": big}, "anyOf": [{"$ref": "#/$defs/big", "title": str(i)} for i in range(50)]}
    nodes = SchemaNodes(wrappers)
    root = nodes.nodes[nodes.root_node]
    assert root[0] == "union" and len(root[1]) == 1  # fifty wrappers, one option


def test_bounds_are_checked_before_huge_ones_are_dropped():
    with pytest.raises(UserError, match="below"):
        check_schema({"type": "string", "minLength": 2**40, "maxLength": 2**35})


def test_the_caps_leave_room_to_finish_what_they_let_begin():
    grammar, state = _after({"type": "number"}, "1" * (MAX_NUMBER_BYTES - 1))
    assert not grammar.step(state, ord("."))  # no room left for a digit after it
    assert grammar.step(grammar.advance(grammar.initial, b"1" * (MAX_NUMBER_BYTES - 2)), ord("."))
    free = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True}
    grammar, state = _after(free, '{"' + "k" * (MAX_KEY_BYTES - 1))
    assert not grammar.step(state, ord("\\")) and grammar.step(state, ord("k"))
    long_name = "n" * (MAX_KEY_BYTES + 44)
    listed = {"type": "object", "properties": {long_name: {"type": "integer"}}, "required": [long_name],
              "additionalProperties": True}
    assert _complete(listed, '{"%s": 1}' % long_name)
