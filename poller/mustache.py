"""Mustache templates that render exactly as mustache.js 4.2.0 renders them.

Unleash's webhook integration renders bodies with mustache.js on JavaScript
values; users move their templates to us and expect the same bytes. chevron and
other Python engines differ in escaping, value printing, truthiness and
whitespace handling, so this is a reimplementation of mustache.js's behaviour:

- Tokenizing follows mustache.js, including its standalone-line rule (a line
  holding only section, comment, partial or delimiter tags and whitespace loses
  all of that whitespace, newline included) and JavaScript's definition of `\\s`.
- Lookups walk the context stack like mustache.js, including dotted names,
  `length` and numeric indexes of arrays and strings (strings counted in UTF-16
  code units), and the rule that a plain name is never looked up on a string.
- Values print with JavaScript's `String()`; null and missing print nothing.

Not reproduced: members JavaScript objects inherit from their prototypes
(`toString`, `constructor`, `map`...), lambdas, and partials, which Unleash never
passes, so `{{> name}}` renders nothing.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from poller.jsvalues import json_stringify, to_js_string, utf16_length, utf16_unit_at

__all__ = [
    "Escape",
    "LimitError",
    "RenderError",
    "Template",
    "TemplateError",
    "compile_template",
    "escape_html",
    "escape_json",
    "escape_none",
]

Escape = Callable[[str], str]


class TemplateError(ValueError):
    """The template does not parse; the message matches mustache.js's."""


class RenderError(ValueError):
    """mustache.js would throw while rendering this view with this template."""


class LimitError(RenderError):
    """The render passed its output size or its time budget and was stopped."""


class _Output:
    """Where a render writes: counts what it holds and stops the render once that passes
    `max_chars`, and, between the items of a section, once `deadline` has passed."""

    __slots__ = ("budget_s", "deadline", "max_chars", "parts", "size")

    def __init__(self, max_chars: float, budget_s: float) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.max_chars = max_chars
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.max_chars:
            raise LimitError(f"template output passed {self.max_chars} characters; stopped")

    def tick(self) -> None:
        # Sections over lists are the only way a template's work multiplies.
        if time.monotonic() > self.deadline:
            raise LimitError(f"template ran longer than {self.budget_s:g}s; stopped")


# JavaScript's \s, which is narrower than Python's (no \x1c-\x1f, no \x85).
_JS_SPACE = "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_SPACES = re.compile(f"[{_JS_SPACE}]*")
_SPACE_RUN = re.compile(f"[{_JS_SPACE}]+")
_NON_SPACE = re.compile(f"[^{_JS_SPACE}]")
_EQUALS = re.compile(f"[{_JS_SPACE}]*=")
_CURLY = re.compile(f"[{_JS_SPACE}]*\\}}")
_TAG_KINDS = frozenset("#^/>{&=!")
_SECTION_KINDS = ("#", "^")
_VARIABLE_KINDS = ("name", "&")
_MISSING = object()
_INDEX = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True, slots=True)
class _Delimiters:
    opening: re.Pattern[str]
    closing: re.Pattern[str]
    closing_curly: re.Pattern[str]

    @classmethod
    def of(cls, opening: str, closing: str) -> _Delimiters:
        # The opening pattern swallows the spaces after it, so `{{ #a}}` is a section.
        return cls(
            opening=re.compile(re.escape(opening) + f"[{_JS_SPACE}]*"),
            closing=re.compile(f"[{_JS_SPACE}]*" + re.escape(closing)),
            closing_curly=re.compile(f"[{_JS_SPACE}]*" + re.escape("}" + closing)),
        )

    @classmethod
    def parse(cls, spec: str) -> _Delimiters:
        """The delimiters a `{{=<% %>=}}` tag sets; words after the second are ignored."""
        words = _SPACE_RUN.split(spec)[:2]
        if len(words) != 2:
            raise TemplateError(f"Invalid tags: {','.join(words)}")
        return cls.of(words[0], words[1])


_DEFAULT_DELIMITERS = _Delimiters.of("{{", "}}")


@dataclass(slots=True)
class _Token:
    kind: str  # "text", "name", "&", or the tag's sigil: # ^ / > ! =
    value: str
    start: int = 0


@dataclass(slots=True)
class _Line:
    """What the current template line holds, to decide whether it is standalone."""

    text_tokens: list[int] = field(default_factory=list)
    has_tag: bool = False
    has_content: bool = False


class _Tokenizer:
    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0
        self.delimiters = _DEFAULT_DELIMITERS
        self.tokens: list[_Token | None] = []
        self.line = _Line()
        self.open_sections: list[_Token] = []

    def run(self) -> list[_Token]:
        source = self.source
        while self.pos < len(source):
            opening = self.delimiters.opening.search(source, self.pos)
            self._add_text(source[self.pos : opening.start() if opening else len(source)])
            if opening is None:
                break
            self.pos = opening.end()
            self.line.has_tag = True
            self._add_tag(opening.start())
        self._end_line()
        if self.open_sections:
            name = self.open_sections[-1].value
            raise TemplateError(f'Unclosed section "{name}" at {utf16_length(source)}')
        return [token for token in self.tokens if token is not None]

    def _add_text(self, text: str) -> None:
        begin = 0
        while begin < len(text):
            newline = text.find("\n", begin)
            end = len(text) if newline < 0 else newline + 1
            piece = text[begin:end]
            self.line.text_tokens.append(len(self.tokens))
            self.tokens.append(_Token("text", piece))
            if _NON_SPACE.search(piece):
                self.line.has_content = True
            if newline >= 0:
                self._end_line()
            begin = end

    def _end_line(self) -> None:
        # On a standalone line every text piece is whitespace, since any other
        # character would have counted as content.
        if self.line.has_tag and not self.line.has_content:
            for index in self.line.text_tokens:
                self.tokens[index] = None
        self.line = _Line()

    def _add_tag(self, start: int) -> None:
        kind, value = self._read_tag()
        token = _Token(kind, value, start)
        self.tokens.append(token)
        if kind in _SECTION_KINDS:
            self.open_sections.append(token)
        elif kind == "/":
            self._close_section(token)
        elif kind in _VARIABLE_KINDS:
            self.line.has_content = True
        elif kind == "=":
            self.delimiters = _Delimiters.parse(value)

    def _read_tag(self) -> tuple[str, str]:
        source, delimiters = self.source, self.delimiters
        kind = "name"
        if self.pos < len(source) and source[self.pos] in _TAG_KINDS:
            kind = source[self.pos]
            self.pos += 1
        self._skip(_SPACES)
        if kind == "=":
            # The new delimiters end at the first "="; anything after it up to the
            # closing delimiter is ignored.
            value = self._scan_until(_EQUALS)
            self._scan_until(delimiters.closing)
        elif kind == "{":
            value = self._scan_until(delimiters.closing_curly)
            self._skip(_CURLY)
            self._scan_until(delimiters.closing)
            kind = "&"
        else:
            value = self._scan_until(delimiters.closing)
        if not self._skip(delimiters.closing):
            raise TemplateError(f"Unclosed tag at {utf16_length(source[: self.pos])}")
        return kind, value

    def _close_section(self, token: _Token) -> None:
        at = utf16_length(self.source[: token.start])
        if not self.open_sections:
            raise TemplateError(f'Unopened section "{token.value}" at {at}')
        opened = self.open_sections.pop()
        if opened.value != token.value:
            raise TemplateError(f'Unclosed section "{opened.value}" at {at}')

    def _skip(self, pattern: re.Pattern[str]) -> bool:
        match = pattern.match(self.source, self.pos)
        if match is None:
            return False
        self.pos = match.end()
        return True

    def _scan_until(self, pattern: re.Pattern[str]) -> str:
        """Consume up to where `pattern` next matches, or to the end if it never does."""
        match = pattern.search(self.source, self.pos)
        end = match.start() if match else len(self.source)
        skipped = self.source[self.pos : end]
        self.pos = end
        return skipped


class _Name:
    """A tag's name, resolved against the context stack the way mustache.js does."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def resolve(self, stack: list[object]) -> object:
        """The value for this name, or None when it is null or nowhere to be found."""
        name = self.text
        for view in reversed(stack):
            if type(view) is dict:
                if name in view:
                    return view[name]
            elif view is None:
                # mustache.js reads the property off the view itself, which throws for null.
                raise RenderError(f"Cannot read properties of null (reading '{name}')")
            # Primitives are skipped: a plain `{{length}}` never means a string's length.
            elif isinstance(view, dict | list):
                found = _own_property(view, name)
                if found is not _MISSING:
                    return found
        return None


class _Dot(_Name):
    __slots__ = ()

    def resolve(self, stack: list[object]) -> object:
        return stack[-1]


class _Path(_Name):
    """A dotted name: the first context holding the whole path wins."""

    __slots__ = ("parts",)

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.parts = text.split(".")

    def resolve(self, stack: list[object]) -> object:
        for view in reversed(stack):
            value = view
            for part in self.parts:
                if value is None or value is _MISSING:
                    break
                value = _own_property(value, part)
            else:
                if value is not _MISSING:
                    return value
        return None


def _name(text: str) -> _Name:
    if text == ".":
        return _Dot(text)
    # A leading dot does not make a path: ".x" is looked up as one name.
    return _Path(text) if text.find(".") > 0 else _Name(text)


def _own_property(value: object, key: str) -> object:
    """`value[key]` for the properties JSON-derived values own in JavaScript."""
    if isinstance(value, dict):
        return value.get(key, _MISSING)
    if isinstance(value, list):
        if key == "length":
            return len(value)
        if _INDEX.fullmatch(key) and int(key) < len(value):
            return value[int(key)]
    elif isinstance(value, str):
        if key == "length":
            return utf16_length(value)
        if _INDEX.fullmatch(key):
            unit = utf16_unit_at(value, int(key))
            return _MISSING if unit is None else unit
    return _MISSING


def _is_falsy(value: object) -> bool:
    """JavaScript falsiness: empty lists and objects are truthy, NaN is falsy."""
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return not value
    if isinstance(value, int | float):
        return not value or (isinstance(value, float) and math.isnan(value))
    return False


class _Node:
    __slots__ = ()

    def render(self, stack: list[object], escape: Escape, out: _Output) -> None:
        raise NotImplementedError


class _Text(_Node):
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def render(self, stack: list[object], escape: Escape, out: _Output) -> None:
        out.append(self.text)


class _Variable(_Node):
    __slots__ = ("escaped", "name")

    def __init__(self, name: _Name, *, escaped: bool) -> None:
        self.name = name
        self.escaped = escaped

    def render(self, stack: list[object], escape: Escape, out: _Output) -> None:
        value = self.name.resolve(stack)
        if value is not None:
            text = value if type(value) is str else to_js_string(value)
            out.append(escape(text) if self.escaped else text)


class _Section(_Node):
    __slots__ = ("children", "name")

    def __init__(self, name: _Name, children: tuple[_Node, ...]) -> None:
        self.name = name
        self.children = children

    def render(self, stack: list[object], escape: Escape, out: _Output) -> None:
        value = self.name.resolve(stack)
        if _is_falsy(value):
            return
        if value is True:
            # mustache.js pushes objects, strings and numbers, but not `true`.
            _render_all(self.children, stack, escape, out)
            return
        for item in value if isinstance(value, list) else (value,):
            out.tick()
            stack.append(item)
            _render_all(self.children, stack, escape, out)
            stack.pop()


class _InvertedSection(_Section):
    __slots__ = ()

    def render(self, stack: list[object], escape: Escape, out: _Output) -> None:
        value = self.name.resolve(stack)
        if _is_falsy(value) or (isinstance(value, list) and not value):
            _render_all(self.children, stack, escape, out)


def _render_all(
    nodes: tuple[_Node, ...], stack: list[object], escape: Escape, out: _Output
) -> None:
    for node in nodes:
        node.render(stack, escape, out)


def _build_tree(tokens: list[_Token]) -> tuple[_Node, ...]:
    """Nest the tokens into sections; comments, delimiter changes and partials render nothing."""
    children: list[_Node] = []
    parents: list[tuple[_Token, list[_Node]]] = []
    for token in tokens:
        if token.kind == "text":
            if children and isinstance(children[-1], _Text):
                children[-1] = _Text(children[-1].text + token.value)
            else:
                children.append(_Text(token.value))
        elif token.kind in _VARIABLE_KINDS:
            children.append(_Variable(_name(token.value), escaped=token.kind == "name"))
        elif token.kind in _SECTION_KINDS:
            parents.append((token, children))
            children = []
        elif token.kind == "/":
            opened, parent = parents.pop()
            kind = _Section if opened.kind == "#" else _InvertedSection
            parent.append(kind(_name(opened.value), tuple(children)))
            children = parent
    return tuple(children)


class Template:
    """A compiled template; render it as often as needed."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: tuple[_Node, ...]) -> None:
        self._nodes = nodes

    def render(
        self,
        view: Mapping[str, object],
        escape: Escape,
        max_chars: float = math.inf,
        budget_s: float = math.inf,
    ) -> str:
        """Render like `Mustache.render(source, view, undefined, {escape})`.

        Raises RenderError where mustache.js would throw: a plain name looked up
        inside a section over a list element that is null; LimitError as soon as the
        output passes `max_chars` or the render has run `budget_s` seconds.
        """
        stack: list[object] = [view if type(view) is dict else dict(view)]
        out = _Output(max_chars, budget_s)
        _render_all(self._nodes, stack, escape, out)
        return "".join(out.parts)


def compile_template(source: str) -> Template:
    """Parse `source` once; raises TemplateError with mustache.js's message."""
    return Template(_build_tree(_Tokenizer(source).run()))


_HTML_ENTITIES = (
    ("&", "&amp;"),  # first, so the entities added below are not escaped again
    ("<", "&lt;"),
    (">", "&gt;"),
    ('"', "&quot;"),
    ("'", "&#39;"),
    ("/", "&#x2F;"),
    ("`", "&#x60;"),
    ("=", "&#x3D;"),
)
_HTML_SPECIAL = re.compile("[&<>\"'/`=]")


def escape_html(text: str) -> str:
    """mustache.js's default escaping, which covers eight characters, not four."""
    if _HTML_SPECIAL.search(text) is None:
        return text
    for character, entity in _HTML_ENTITIES:
        text = text.replace(character, entity)
    return text


def escape_none(text: str) -> str:
    """No escaping, as in Unleash up to 8.0.2."""
    return text


def escape_json(text: str) -> str:
    """Escape `text` for the inside of a JSON string literal, as JSON.stringify would."""
    return json_stringify(text)[1:-1]
