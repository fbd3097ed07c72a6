"""JavaScript value semantics: tables of known answers, then the same functions against Node."""

from __future__ import annotations

import dataclasses
import math
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from poller.jsvalues import (
    JSDate,
    encode_utf8,
    json_stringify,
    number_to_string,
    to_js_string,
    utf16_length,
    utf16_unit_at,
)
from tests.support.node import require_node, run_json

NODE_MODULES = Path(__file__).parent / "unleash" / "8.2.0" / "node_modules"
DATE_MARK = "$jsdate"  # how a JSDate travels to Node; no generated key looks like it

NOV_28 = JSDate.from_iso("2026-11-28T13:05:31.123Z")

NUMBERS = [
    (0, "0"),
    (-0.0, "0"),
    (1.0, "1"),
    (-1.5, "-1.5"),
    (1e21, "1e+21"),
    (1e20, "100000000000000000000"),
    (123456789012345680000.0, "123456789012345680000"),
    (1e-7, "1e-7"),
    (1.5e-7, "1.5e-7"),
    (1e-6, "0.000001"),
    (0.000015, "0.000015"),
    (0.1 + 0.2, "0.30000000000000004"),
    (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (2**53, "9007199254740992"),
    (2**53 + 1, "9007199254740992"),
    (123456789012345678901234, "1.2345678901234569e+23"),
    (-(2**63), "-9223372036854776000"),
    (10**400, "Infinity"),
    (-(10**400), "-Infinity"),
    (math.inf, "Infinity"),
    (-math.inf, "-Infinity"),
    (math.nan, "NaN"),
]


@pytest.mark.parametrize(("number", "expected"), NUMBERS)
def test_number_to_string(number: float, expected: str) -> None:
    """Numbers print as JavaScript's Number::toString prints the nearest double."""
    assert number_to_string(number) == expected


JS_STRINGS = [
    (None, "null"),
    (True, "true"),
    (False, "false"),
    ("x", "x"),
    (1.0, "1"),
    ([], ""),
    ([1, None, [2, None], "a", True], "1,,2,,a,true"),
    ([{}], "[object Object]"),
    ({}, "[object Object]"),
    ({"a": 1}, "[object Object]"),
    (NOV_28, "Sat Nov 28 2026 13:05:31 GMT+0000 (Coordinated Universal Time)"),
]


@pytest.mark.parametrize(("value", "expected"), JS_STRINGS)
def test_to_js_string(value: object, expected: str) -> None:
    """Values print as JavaScript's String() prints them."""
    assert to_js_string(value) == expected


@pytest.mark.parametrize("value", [(1, 2), {1, 2}, b"x", object()])
def test_to_js_string_refuses_values_json_cannot_hold(value: object) -> None:
    """Types that JSON cannot produce are an error, not a guess."""
    with pytest.raises(TypeError, match="not a JSON-derived value"):
        to_js_string(value)


JSON_CASES = [
    (None, "null"),
    ("plain", '"plain"'),
    ({"a": [1, "b", None, True, {}], "c": {"d": 0.5}}, '{"a":[1,"b",null,true,{}],"c":{"d":0.5}}'),
    (
        {"b": 1, "2": 2, "1": 3, "01": 4, "4294967295": 5},
        '{"1":3,"2":2,"b":1,"01":4,"4294967295":5}',
    ),
    ([1.0, 1e21, 1e-7, -0.0, 2**53 + 1, 10**400], "[1,1e+21,1e-7,0,9007199254740992,null]"),
    ([math.nan, math.inf], "[null,null]"),
    ("é 日 😀 \u2028 \x7f", '"é 日 😀 \u2028 \x7f"'),
    ('"\\/\b\f\n\r\t\x00\x1f', '"\\"\\\\/\\b\\f\\n\\r\\t\\u0000\\u001f"'),
    ({"\ud83d": "a\ude00b"}, '{"\\ud83d":"a\\ude00b"}'),
    ("\ud83d\ude00", '"\ud83d\ude00"'),
    ({"at": NOV_28, "n": 1.0}, '{"at":"2026-11-28T13:05:31.123Z","n":1}'),
    (NOV_28, '"2026-11-28T13:05:31.123Z"'),
]


@pytest.mark.parametrize(("value", "expected"), JSON_CASES)
def test_json_stringify(value: object, expected: str) -> None:
    """JSON comes out as JavaScript's JSON.stringify writes it."""
    assert json_stringify(value) == expected


def test_json_stringify_refuses_non_string_keys() -> None:
    """A dict JSON could not have produced is an error."""
    with pytest.raises(TypeError, match="keys must be str"):
        json_stringify({1: "a"})


DATES = [
    ("2026-11-28T13:05:31.123Z", "2026-11-28T13:05:31.123Z"),
    ("2026-11-28T13:05:31.1239Z", "2026-11-28T13:05:31.123Z"),
    ("2026-11-28T13:05:31.5+02:00", "2026-11-28T11:05:31.500Z"),
    ("2026-11-28T23:30:00-01:00", "2026-11-29T00:30:00.000Z"),
    ("2026-11-28T13:05Z", "2026-11-28T13:05:00.000Z"),
    ("1969-12-31T23:59:59.999Z", "1969-12-31T23:59:59.999Z"),
    ("0005-01-01T00:00:00Z", "0005-01-01T00:00:00.000Z"),
]


@pytest.mark.parametrize(("text", "iso"), DATES)
def test_date_from_iso(text: str, iso: str) -> None:
    """ISO strings parse as `new Date(text)` does, milliseconds truncated."""
    assert JSDate.from_iso(text).to_iso() == iso


@pytest.mark.parametrize(
    "text",
    ["2026-11-28T13:05:31", "2026-11-28", "2026-02-30T00:00:00Z", "2026-11-28T13:05+24:00", ""],
)
def test_date_from_iso_refuses_ambiguous_or_invalid(text: str) -> None:
    """Strings without a zone or with an impossible date are refused."""
    with pytest.raises(ValueError, match="date-time"):
        JSDate.from_iso(text)


def test_date_to_string_pads_small_years() -> None:
    """Years below 1000 keep four digits in Date.prototype.toString."""
    date = JSDate.from_iso("0005-01-01T00:00:00Z")
    assert date.to_string() == "Sat Jan 01 0005 00:00:00 GMT+0000 (Coordinated Universal Time)"


def test_date_is_an_immutable_value() -> None:
    """Dates compare by instant and cannot be changed."""
    assert JSDate.from_iso("2026-11-28T14:05:31.123+01:00") == NOV_28
    assert NOV_28.epoch_ms == 1795871131123
    with pytest.raises(dataclasses.FrozenInstanceError):
        NOV_28.epoch_ms = 0  # type: ignore[misc]


def test_date_out_of_range_is_refused() -> None:
    """An instant Python's calendar cannot show is refused at construction."""
    with pytest.raises(ValueError, match="out of range"):
        JSDate(10**16)


UTF16 = [
    ("", 0, None),
    ("abc", 3, "b"),
    ("é", 1, None),
    ("😀a", 3, "\ude00"),
    ("\ud83d\ude00", 2, "\ude00"),
    ("a\ud800", 2, "\ud800"),
]


@pytest.mark.parametrize(("text", "length", "second"), UTF16)
def test_utf16_length_and_unit(text: str, length: int, second: str | None) -> None:
    """Length and indexing count UTF-16 code units, as JavaScript strings do."""
    assert utf16_length(text) == length
    assert utf16_unit_at(text, 1) == second
    assert utf16_unit_at(text, -1) is None


UTF8 = [
    ("aé😀", "61c3a9f09f9880"),
    ("\ud83d\ude00", "f09f9880"),
    ("a\ud83db", "61efbfbd62"),
    ("\ude00\ud83d", "efbfbdefbfbd"),
]


@pytest.mark.parametrize(("text", "hex_bytes"), UTF8)
def test_encode_utf8(text: str, hex_bytes: str) -> None:
    """Bytes match Node's: split surrogate pairs rejoin, lone ones become U+FFFD."""
    assert encode_utf8(text).hex() == hex_bytes


# --- against Node --------------------------------------------------------------------------

NODE_SCRIPT = r"""
const MARK = '$jsdate';
const revive = (key, value) =>
  value !== null && typeof value === 'object' && MARK in value ? new Date(value[MARK]) : value;
const operations = {
  number: (text) => String(Number(text)),
  string: (value) => String(value),
  json: (value) => JSON.stringify(value),
  date: (ms) => [new Date(ms).toISOString(), String(new Date(ms))],
  parse_date: (text) => new Date(text).toISOString(),
  utf8: (text) => Buffer.from(text, 'utf8').toString('hex'),
};
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const cases = JSON.parse(input, revive);
  process.stdout.write(JSON.stringify(cases.map(([op, arg]) => operations[op](arg))));
});
"""


def _encode_for_node(value: object) -> object:
    if isinstance(value, JSDate):
        return {DATE_MARK: value.epoch_ms}
    raise TypeError(type(value).__name__)


@pytest.fixture(scope="module")
def node() -> Callable[[list[tuple[str, object]]], list[object]]:
    """Runs (operation, argument) pairs through one Node process and returns the answers."""
    node_path = require_node(NODE_MODULES)

    def run(cases: list[tuple[str, object]]) -> list[object]:
        answers = run_json(node_path, ["-e", NODE_SCRIPT], cases, default=_encode_for_node)
        assert isinstance(answers, list)
        assert len(answers) == len(cases)
        return answers

    return run


def _js_equal(ours: object, theirs: object) -> bool:
    """Equal as JavaScript sees strings: the same UTF-16 code units."""
    if isinstance(ours, str) and isinstance(theirs, str):
        utf16 = "utf-16-le"
        return ours.encode(utf16, "surrogatepass") == theirs.encode(utf16, "surrogatepass")
    return ours == theirs


def _assert_all_match(
    cases: list[tuple[str, object]], ours: list[object], theirs: list[object]
) -> None:
    mismatches = [
        (case, mine, node_answer)
        for case, mine, node_answer in zip(cases, ours, theirs, strict=True)
        if not _js_equal(mine, node_answer)
    ]
    assert not mismatches, f"{len(mismatches)}/{len(cases)} differ, e.g. {mismatches[:5]}"


def _random_double(rng: random.Random) -> float:
    while True:
        (value,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if math.isfinite(value):
            return float(value)


def _random_number(rng: random.Random) -> int | float:
    roll = rng.random()
    if roll < 0.4:
        return _random_double(rng)
    if roll < 0.6:
        return rng.randint(-(10**30), 10**30) // 10 ** rng.randint(0, 30)
    if roll < 0.8:
        return round(rng.uniform(-1e6, 1e6), rng.randint(0, 8)) * 10.0 ** rng.randint(-12, 25)
    return rng.choice([n for n, _ in NUMBERS])


def _number_as_text(number: float) -> str:
    if isinstance(number, float) and not math.isfinite(number):
        return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
    return repr(number)


def test_number_to_string_matches_node(node: Callable[..., list[object]]) -> None:
    """number_to_string equals String(Number(x)) for random doubles and integers."""
    rng = random.Random(20261128)
    numbers = [_random_number(rng) for _ in range(20_000)]
    cases: list[tuple[str, object]] = [("number", _number_as_text(n)) for n in numbers]
    _assert_all_match(cases, [number_to_string(n) for n in numbers], node(cases))


NASTY_STRINGS = [
    "",
    "0",
    " ",
    "a",
    "null",
    "true",
    "[object Object]",
    'q" <t> & /s =e',
    "'`=",
    "\\",
    "\n\r\t\b\f\x00\x1f\x7f",
    "é",
    "日本語",
    "😀",
    "\ud83d",
    "\ude00",
    "a\ud800b",
    "x\udfff",
    "\u2028\u2029",
    "\ufeff",
    "\u00a0",
    "{{x}}",
    "</script>",
]
KEYS = [
    "a",
    "b",
    "name",
    "length",
    "0",
    "1",
    "2",
    "10",
    "01",
    "-1",
    "1.5",
    "4294967294",
    "4294967295",
    "",
    " ",
    "é",
    "😀",
    "a.b",
    "__proto__",
]
SPECIAL_NUMBERS = [0, -0.0, 1, -1, 1.0, 1.5, 1e21, 1e-7, 0.000015, 2**53 + 1, 10**400, 1e16, 0.1]


def random_value(rng: random.Random, depth: int = 3) -> object:
    """A JSON-derived value full of the cases JavaScript prints differently from Python."""
    roll = rng.random()
    if depth <= 0 or roll < 0.5:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice(NASTY_STRINGS) + rng.choice(NASTY_STRINGS)
        if kind == 1:
            return rng.choice(SPECIAL_NUMBERS)
        if kind == 2:
            return _random_number(rng) if rng.random() < 0.5 else rng.randint(-1000, 1000)
        return rng.choice([None, True, False, JSDate(rng.randint(-(10**12), 10**13))])
    if roll < 0.75:
        return [random_value(rng, depth - 1) for _ in range(rng.randrange(5))]
    return {rng.choice(KEYS): random_value(rng, depth - 1) for _ in range(rng.randrange(6))}


def _finite(value: object) -> object:
    """Replace NaN and infinities, which cannot travel to Node as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return 0.5
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def test_json_stringify_and_string_match_node(node: Callable[..., list[object]]) -> None:
    """json_stringify equals JSON.stringify and to_js_string equals String() on nasty values."""
    rng = random.Random(4242)
    values = [_finite(random_value(rng)) for _ in range(4_000)]
    cases = [("json", v) for v in values] + [("string", v) for v in values]
    ours = [json_stringify(v) for v in values] + [to_js_string(v) for v in values]
    _assert_all_match(cases, ours, node(cases))


def test_dates_match_node(node: Callable[..., list[object]]) -> None:
    """JSDate's ISO and toString forms, and from_iso parsing, equal Node's Date in UTC."""
    rng = random.Random(7)
    dates = [JSDate(rng.randint(-62_135_596_800_000, 253_402_300_799_999)) for _ in range(2_000)]
    texts = [
        f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
        f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
        f".{rng.randrange(10**6):06d}{rng.choice('+-')}{rng.randrange(15):02d}:{rng.randrange(60):02d}"
        for _ in range(2_000)
    ]
    cases: list[tuple[str, object]] = [("date", d.epoch_ms) for d in dates]
    cases += [("parse_date", text) for text in texts]
    ours: list[object] = [[d.to_iso(), d.to_string()] for d in dates]
    ours += [JSDate.from_iso(text).to_iso() for text in texts]
    _assert_all_match(cases, ours, node(cases))


def test_encode_utf8_matches_node(node: Callable[..., list[object]]) -> None:
    """encode_utf8 gives the bytes Buffer.from(text, 'utf8') gives."""
    rng = random.Random(99)
    texts = ["".join(rng.choices(NASTY_STRINGS, k=rng.randrange(1, 6))) for _ in range(2_000)]
    cases: list[tuple[str, object]] = [("utf8", text) for text in texts]
    _assert_all_match(cases, [encode_utf8(text).hex() for text in texts], node(cases))
