"""JavaScript value semantics for JSON-derived Python values.

Unleash builds webhook bodies in Node.js, so to be byte-compatible a value must
print the way JavaScript prints it: `1` not `1.0`, `true` not `True`, objects as
`[object Object]`, JSON with JavaScript's key order and escapes. The values are
what `json.loads` produces (dict, list, str, int, float, bool, None) plus
`JSDate`, because Unleash hands its templates a `Date` for `createdAt`.

Python strings stand for JavaScript strings, which are sequences of UTF-16 code
units: a lone surrogate is a valid value, and two adjacent surrogate halves mean
the same as the astral character they encode.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

__all__ = [
    "JSDate",
    "encode_utf8",
    "json_stringify",
    "number_to_string",
    "to_js_string",
    "utf16_length",
    "utf16_unit_at",
]

# Integers up to 2**53 are exact doubles, so their decimal form is already JavaScript's.
_EXACT_INT_LIMIT = 2**53
# Finite, non-integral floats in this range print the same in Python's repr and in JavaScript.
_PLAIN_FLOAT_MIN = 1e-4
_PLAIN_FLOAT_MAX = 1e16
_NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})
_FAST_PATH_NODE_BUDGET = 100_000
# Array indices run up to 2**32 - 2; JavaScript orders such keys before all others.
_MAX_ARRAY_INDEX = 2**32 - 2
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
_DIGITS = frozenset("0123456789")
_LONE_SURROGATE = re.compile(
    "[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]"
)
_LITERALS = {None: "null", True: "true", False: "false"}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_ISO_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:\.([0-9]+))?)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True, slots=True)
class JSDate:
    """A JavaScript `Date`, shown as Node shows it when the process runs in UTC.

    Limited to the years 1 to 9999, which is what Python's calendar covers.
    """

    epoch_ms: int
    _iso: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            moment = _EPOCH + self.epoch_ms * _ONE_MS
        except OverflowError:
            raise ValueError(f"date out of range: {self.epoch_ms} ms") from None
        # Computed once because every delivery serialises the event's date.
        iso = (
            f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
            f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
        )
        object.__setattr__(self, "_iso", iso)

    @classmethod
    def from_iso(cls, text: str) -> JSDate:
        """Parse an ISO-8601 date-time with an explicit zone, as `new Date(text)` would.

        Without a zone JavaScript would read the local time of the Unleash host,
        which we cannot know, so such strings are refused.
        """
        match = _ISO_DATE_TIME.fullmatch(text)
        if match is None:
            raise ValueError(f"not an ISO-8601 date-time with a zone: {text!r}")
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        try:
            moment = datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second or 0),
                tzinfo=UTC,
            )
        except ValueError as error:
            raise ValueError(f"invalid date-time {text!r}: {error}") from None
        offset = timedelta(0)
        if zone != "Z":
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(f"invalid zone offset in date-time {text!r}")
            offset = timedelta(hours=hours, minutes=minutes) * (1 if zone[0] == "+" else -1)
        # V8 keeps milliseconds and drops further digits rather than rounding them.
        milliseconds = int((fraction or "").ljust(3, "0")[:3])
        return cls((moment - offset - _EPOCH) // _ONE_MS + milliseconds)

    def to_iso(self) -> str:
        """`Date.prototype.toISOString`, which is also what `JSON.stringify` writes."""
        return self._iso

    def to_string(self) -> str:
        """`Date.prototype.toString` in the UTC time zone."""
        moment = _EPOCH + self.epoch_ms * _ONE_MS
        return (
            f"{_WEEKDAYS[moment.weekday()]} {_MONTHS[moment.month - 1]} {moment.day:02d} "
            f"{moment.year:04d} {self._iso[11:19]} GMT+0000 (Coordinated Universal Time)"
        )


def number_to_string(x: int | float) -> str:
    """ECMAScript `Number::toString(10)` of `x` taken as a double."""
    if isinstance(x, int):
        if -_EXACT_INT_LIMIT <= x <= _EXACT_INT_LIMIT:
            return str(int(x))
        x = _int_to_double(x)
    if math.isnan(x):
        return "NaN"
    if x == 0:
        return "0"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x < 0:
        return "-" + _positive_number_to_string(-x)
    return _positive_number_to_string(x)


def _int_to_double(x: int) -> float:
    # Python rounds ints to the nearest double like JavaScript's number parser does.
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _positive_number_to_string(x: float) -> str:
    if x < _EXACT_INT_LIMIT and x.is_integer():
        return str(int(x))
    digits, point = _shortest_digits(x)
    count = len(digits)
    if count <= point <= 21:
        return digits + "0" * (point - count)
    if 0 < point <= 21:
        return f"{digits[:point]}.{digits[point:]}"
    if -6 < point <= 0:
        return f"0.{'0' * -point}{digits}"
    exponent = point - 1
    mantissa = digits if count == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"


def _shortest_digits(x: float) -> tuple[str, int]:
    """The shortest round-tripping digits of `x` and where the decimal point goes.

    Python's repr and ECMAScript pick the same digits (the shortest string that
    reads back as `x`, the closest one on a tie); only the layout differs.
    """
    mantissa, _, exponent = repr(x).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + int(exponent or 0)
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    return significant.rstrip("0"), point


def to_js_string(value: object) -> str:
    """JavaScript `String(value)`.

    One difference: JavaScript throws for an object with its own `toString` key,
    which no Unleash event has; this prints `[object Object]` for it.
    """
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return _LITERALS[value]
    if isinstance(value, int | float):
        return number_to_string(value)
    if isinstance(value, list):
        # Array.prototype.join writes null and undefined elements as nothing.
        return ",".join("" if item is None else to_js_string(item) for item in value)
    if isinstance(value, dict):
        return "[object Object]"
    if isinstance(value, JSDate):
        return value.to_string()
    raise TypeError(f"{type(value).__name__} is not a JSON-derived value")


def _date_to_iso(value: object) -> str:
    if isinstance(value, JSDate):
        return value.to_iso()
    raise TypeError(f"{type(value).__name__} is not a JSON-derived value")


# Safe without circular checks: JSON-derived values cannot contain themselves.
_FAST_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    check_circular=False,
    allow_nan=False,
    separators=(",", ":"),
    default=_date_to_iso,
)


def json_stringify(value: object) -> str:
    """JavaScript `JSON.stringify(value)` without indentation."""
    text = _FAST_ENCODER.encode(value) if _fits_fast_path(value) else _exact_json(value)
    # Surrogates can only sit inside string literals, so escaping them afterwards is
    # exact. The UTF-8 codec is the quickest way to learn whether there are any.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _LONE_SURROGATE.sub(_escape_surrogate, text)
    return text


def _escape_surrogate(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


# The C encoder writes these exactly as JavaScript would; dates go through `default`.
_VERBATIM_TYPES: frozenset[type] = frozenset({str, bool, type(None), JSDate})


def _fits_fast_path(value: object) -> bool:
    """Whether the C encoder writes `value` exactly as JavaScript would."""
    # A loop rather than recursion: this walk runs for every delivery. The budget
    # stops a cyclic value from spinning forever; the exact path then fails loudly.
    pending = [value]
    budget = _FAST_PATH_NODE_BUDGET
    while pending:
        budget -= 1
        current = pending.pop()
        # Exact type checks: subclasses (IntEnum, OrderedDict...) may print differently.
        if type(current) is dict:
            if not _keys_keep_their_order(current):
                return False
            pending.extend(current.values())
        elif type(current) is list:
            pending.extend(current)
        elif type(current) not in _VERBATIM_TYPES and not _number_prints_verbatim(current):
            return False
        if budget < 0:
            return False
    return True


def _keys_keep_their_order(obj: dict[object, object]) -> bool:
    # Array-index keys would need JavaScript's reordering.
    for key in obj:
        if type(key) is not str or (key[:1] in _DIGITS and _is_array_index(key)):
            return False
    return True


def _number_prints_verbatim(value: object) -> bool:
    if type(value) is int:
        return -_EXACT_INT_LIMIT <= value <= _EXACT_INT_LIMIT
    if type(value) is float:
        magnitude = abs(value)
        return _PLAIN_FLOAT_MIN <= magnitude < _PLAIN_FLOAT_MAX and not magnitude.is_integer()
    return False


def _exact_json(value: object) -> str:
    if value is None or isinstance(value, bool):
        return _LITERALS[value]
    if isinstance(value, str):
        return _FAST_ENCODER.encode(value)
    if isinstance(value, int | float):
        text = number_to_string(value)
        return "null" if text in _NON_FINITE else text
    if isinstance(value, JSDate):
        return f'"{value.to_iso()}"'
    if isinstance(value, list):
        return "[" + ",".join(map(_exact_json, value)) + "]"
    if isinstance(value, dict):
        members = (
            f"{_FAST_ENCODER.encode(key)}:{_exact_json(item)}"
            for key, item in _js_property_order(value)
        )
        return "{" + ",".join(members) + "}"
    raise TypeError(f"{type(value).__name__} is not a JSON-derived value")


def _is_array_index(key: str) -> bool:
    return _ARRAY_INDEX.fullmatch(key) is not None and int(key) <= _MAX_ARRAY_INDEX


def _js_property_order(obj: dict[object, object]) -> list[tuple[str, object]]:
    """Own properties in JavaScript's order: array indices ascending, then insertion order."""
    indices: list[tuple[str, object]] = []
    names: list[tuple[str, object]] = []
    for key, item in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"object keys must be str, not {type(key).__name__}")
        (indices if _is_array_index(key) else names).append((key, item))
    indices.sort(key=lambda pair: int(pair[0]))
    return indices + names


def utf16_length(text: str) -> int:
    """JavaScript's `text.length`: the number of UTF-16 code units."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def utf16_unit_at(text: str, index: int) -> str | None:
    """JavaScript's `text[index]`: one UTF-16 code unit, or None past the end."""
    if text.isascii():
        return text[index] if 0 <= index < len(text) else None
    units = text.encode("utf-16-le", "surrogatepass")
    if not 0 <= index < len(units) // 2:
        return None
    return chr(int.from_bytes(units[2 * index : 2 * index + 2], "little"))


def encode_utf8(text: str) -> bytes:
    """The bytes Node sends for `text`: lone surrogates become U+FFFD, split pairs rejoin."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        units = text.encode("utf-16-le", "surrogatepass")
        return units.decode("utf-16-le", "replace").encode("utf-8")
