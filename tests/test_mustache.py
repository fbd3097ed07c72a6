"""Mustache rendering: tables of known mustache.js answers, then the real mustache.js itself."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from poller.jsvalues import JSDate
from poller.mustache import (
    Escape,
    RenderError,
    TemplateError,
    compile_template,
    escape_html,
    escape_json,
    escape_none,
)
from tests.support.node import require_node, run_json

MUSTACHE_DIR = Path(__file__).parent / "unleash" / "8.2.0" / "node_modules" / "mustache"
DATE_MARK = "$jsdate"  # how a JSDate travels to Node; no generated key looks like it

NOV_28 = JSDate.from_iso("2026-11-28T13:05:31.123Z")
VIEW: dict[str, object] = {
    "name": "q\" <t> & /s =e `'",
    "n": 1.0,
    "big": 1e21,
    "tiny": 1e-7,
    "yes": True,
    "no": False,
    "zero": 0,
    "nan": math.nan,
    "empty": "",
    "zero_text": "0",
    "null": None,
    "none": [],
    "obj": {},
    "list": [1, None, [2, None], "a"],
    "tags": [{"value": "x"}, {"value": "y"}],
    "emoji": "😀a",
    "at": NOV_28,
    "event": {"data": {"name": "f"}, "project": "p"},
}

RENDERS = [
    # what it shows, template, expected
    ("eight characters escaped", "{{name}}", "q&quot; &lt;t&gt; &amp; &#x2F;s &#x3D;e &#x60;&#39;"),
    ("triple mustache is raw", "{{{name}}}", "q\" <t> & /s =e `'"),
    ("ampersand is raw", "{{& name}}", "q\" <t> & /s =e `'"),
    ("numbers print as JavaScript", "{{n}} {{big}} {{tiny}} {{zero}}", "1 1e+21 1e-7 0"),
    ("booleans print as JavaScript", "{{yes}} {{no}}", "true false"),
    ("null and missing print nothing", "[{{null}}{{missing}}{{missing.deeper}}]", "[]"),
    ("arrays join, objects hide", "{{list}}|{{obj}}|{{none}}", "1,,2,,a|[object Object]|"),
    (
        "dates print like Date.toString",
        "{{at}}",
        "Sat Nov 28 2026 13:05:31 GMT+0000 (Coordinated Universal Time)",
    ),
    ("sections iterate arrays", "{{#tags}}<{{value}}>{{/tags}}", "<x><y>"),
    ("dot is each element", "{{#list}}[{{.}}]{{/list}}", "[1][][2,][a]"),
    ("objects are pushed", "{{#event}}{{project}}{{/event}}", "p"),
    ("strings are pushed", "{{#emoji}}{{.}}{{/emoji}}", "😀a"),
    ("true is not pushed", "{{#yes}}{{.}}{{/yes}}", "[object Object]"),
    (
        "JavaScript falsy values skip",
        "{{#empty}}a{{/empty}}{{#zero}}b{{/zero}}{{#no}}c{{/no}}"
        "{{#null}}d{{/null}}{{#missing}}e{{/missing}}{{#nan}}f{{/nan}}",
        "",
    ),
    ("empty list renders nothing", "{{#none}}x{{/none}}", ""),
    ("{} and '0' are truthy", "{{#obj}}a{{/obj}}{{#zero_text}}b{{/zero_text}}", "ab"),
    (
        "inverted shows for falsy and []",
        "{{^empty}}a{{/empty}}{{^none}}b{{/none}}{{^obj}}c{{/obj}}",
        "ab",
    ),
    ("dotted names descend", "{{event.data.name}}", "f"),
    ("lookup climbs the stack", "{{#tags}}{{event.project}}{{/tags}}", "pp"),
    ("length of arrays and strings", "{{list.length}} {{emoji.length}} {{none.length}}", "4 3 0"),
    ("indexes of arrays and strings", "{{tags.1.value}} {{emoji.2}} {{list.01}}", "y a "),
    ("plain length is not a string's", "{{#emoji}}[{{length}}]{{/emoji}}", "[]"),
    ("leading dot is one name", "[{{.name}}]", "[]"),
]


@pytest.mark.parametrize(
    ("template", "expected"), [case[1:] for case in RENDERS], ids=[case[0] for case in RENDERS]
)
def test_render(template: str, expected: str) -> None:
    """Each template renders to what mustache.js renders for the same JavaScript view."""
    assert compile_template(template).render(VIEW, escape_html) == expected


TOKENIZING = [
    ("standalone section lines vanish", "a\n  {{#yes}}  \n b\n  {{/yes}}\nc", "a\n b\nc"),
    ("CRLF standalone lines vanish", "a\r\n{{#yes}}\r\nb\r\n{{/yes}}\r\n", "a\r\nb\r\n"),
    ("comments are standalone", "a\n {{! note\n more }} \nb", "a\nb"),
    ("partials render nothing", "a\n  {{> p}}\nb {{>q}}.", "a\nb ."),
    ("a variable keeps its line", "  {{#yes}}{{n}}\n{{/yes}}", "  1\n"),
    ("last line needs no newline", "a\n  {{#yes}}{{/yes}}  ", "a\n"),
    ("JavaScript whitespace only", "\x1c{{#yes}}\n{{/yes}}\u00a0{{#yes}}\n{{/yes}}", "\x1c\n"),
    ("delimiters change", "{{=<% %>=}}<% n %>{{n}}<%={{ }}=%>{{n}}", "1{{n}}1"),
    ("third delimiter word ignored", "{{=<% %> x=}}<%n%>", "1"),
    ("text after = ignored", "{{=<% %>= x}}<%n%>", "1"),
    ("space after opening", "{{ #yes }}x{{ /yes }}", "x"),
    ("empty template", "", ""),
]


@pytest.mark.parametrize(
    ("template", "expected"),
    [case[1:] for case in TOKENIZING],
    ids=[case[0] for case in TOKENIZING],
)
def test_tokenizing(template: str, expected: str) -> None:
    """Standalone lines, delimiters and tag spacing tokenize exactly as in mustache.js."""
    assert compile_template(template).render(VIEW, escape_html) == expected


ERRORS = [
    ("{{#a}}x", 'Unclosed section "a" at 7'),
    ("{{#a}}{{#b}}{{/a}}", 'Unclosed section "b" at 12'),
    ("x{{/a}}", 'Unopened section "a" at 1'),
    ("😀 {{name", "Unclosed tag at 9"),
    ("{{{name}}", "Unclosed tag at 9"),
    ("{{=<%=}}", "Invalid tags: <%"),
    ("{{==}}", "Invalid tags: "),
]


@pytest.mark.parametrize(("template", "message"), ERRORS)
def test_compile_errors(template: str, message: str) -> None:
    """Broken templates fail at compile time with mustache.js's message and UTF-16 offsets."""
    with pytest.raises(TemplateError) as caught:
        compile_template(template)
    assert str(caught.value) == message


def test_null_element_lookup_raises() -> None:
    """A plain name inside a section over a null element throws, as in mustache.js."""
    template = compile_template("{{#items}}{{.}}{{a.b}}{{x}}{{/items}}")
    with pytest.raises(RenderError, match=r"Cannot read properties of null \(reading 'x'\)"):
        template.render({"items": [None]}, escape_html)


def test_template_renders_many_views() -> None:
    """One compiled template renders each view on its own, with nothing carried over."""
    template = compile_template("{{#a}}{{b}}{{/a}}|{{b}}")
    assert template.render({"a": {"b": 1}, "b": 2}, escape_html) == "1|2"
    assert template.render({"a": [{}], "b": 3}, escape_html) == "3|3"


def test_render_accepts_any_mapping() -> None:
    """The root view may be any Mapping, not only a dict."""
    view = MappingProxyType({"a": "<"})
    assert compile_template("{{a}}").render(view, escape_none) == "<"


ESCAPES = [
    (escape_html, "&<>\"'/`=", "&amp;&lt;&gt;&quot;&#39;&#x2F;&#x60;&#x3D;"),
    (escape_html, "&amp;", "&amp;amp;"),
    (escape_html, "plain é", "plain é"),
    (escape_none, '&<"', '&<"'),
    (escape_json, 'a"\\\n\x01/é\ud800', 'a\\"\\\\\\n\\u0001/é\\ud800'),
]


@pytest.mark.parametrize(("escape", "text", "expected"), ESCAPES)
def test_escapes(escape: Escape, text: str, expected: str) -> None:
    """Escapes cover mustache.js's eight HTML characters, nothing, or a JSON string's inside."""
    assert escape(text) == expected


def test_escape_is_applied_to_double_mustache_only() -> None:
    """The escape function given to render is used for {{x}} and not for {{{x}}}."""
    template = compile_template("{{a}}|{{{a}}}")
    assert template.render({"a": 'x"y'}, escape_json) == 'x\\"y|x"y'


# --- against mustache.js ---------------------------------------------------------------------

NODE_SCRIPT = r"""
const Mustache = require(process.argv[1]);
const MARK = '$jsdate';
const revive = (key, value) =>
  value !== null && typeof value === 'object' && MARK in value ? new Date(value[MARK]) : value;
const escapes = { html: undefined, none: (value) => value };
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const results = JSON.parse(input, revive).map(([template, view, escape]) => {
    try {
      // Like Unleash: no partials; the default escape unless asked for none.
      return Mustache.render(template, view, undefined, { escape: escapes[escape] });
    } catch (error) {
      return { error: `${error.constructor.name}: ${error.message}` };
    }
  });
  process.stdout.write(JSON.stringify(results));
});
"""


@pytest.fixture(scope="module")
def mustache_js() -> Callable[[list[tuple[str, dict[str, object], str]]], list[object]]:
    """Renders (template, view, escape) triples with the real mustache.js in one Node process."""
    node_path = require_node(MUSTACHE_DIR / "mustache.js")

    def run(cases: list[tuple[str, dict[str, object], str]]) -> list[object]:
        answers = run_json(
            node_path, ["-e", NODE_SCRIPT, str(MUSTACHE_DIR)], cases, default=_encode_for_node
        )
        assert isinstance(answers, list)
        assert len(answers) == len(cases)
        return answers

    return run


def _encode_for_node(value: object) -> object:
    if isinstance(value, JSDate):
        return {DATE_MARK: value.epoch_ms}
    raise TypeError(type(value).__name__)


def render_like_mustache_js(template: str, view: dict[str, object], escape: str) -> object:
    """Our answer in the shape the Node script reports: the text, or the error thrown."""
    escape_function = escape_html if escape == "html" else escape_none
    try:
        return compile_template(template).render(view, escape_function)
    except TemplateError as error:
        return {"error": f"Error: {error}"}
    except RenderError as error:
        return {"error": f"TypeError: {error}"}


def _js_equal(ours: object, theirs: object) -> bool:
    """Equal as JavaScript sees strings: the same UTF-16 code units."""
    if isinstance(ours, str) and isinstance(theirs, str):
        utf16 = "utf-16-le"
        return ours.encode(utf16, "surrogatepass") == theirs.encode(utf16, "surrogatepass")
    return ours == theirs


# Names a view can have. Members JavaScript objects inherit (toString, constructor...)
# are left out on purpose: the engine does not model prototypes.
KEYS = [
    "a",
    "b",
    "name",
    "list",
    "obj",
    "str",
    "num",
    "flag",
    "empty",
    "length",
    "0",
    "1",
    "emoji",
    "date",
    "x",
    "é",
    "",
]
NAMES = [
    *KEYS,
    ".",
    "list.length",
    "str.length",
    "emoji.length",
    "emoji.0",
    "emoji.1",
    "list.0",
    "list.1.name",
    "list.01",
    "obj.a",
    "obj.b.c",
    "a.b",
    "a.b.c",
    "str.0",
    "str.1",
    "num.x",
    "missing",
    "missing.x",
    "a..b",
    ".a",
    "a.",
    "obj.length",
    "0.a",
    "date.x",
    "flag.length",
    "list.2.length",
    "b.0.name",
]
STRINGS = [
    "",
    "0",
    " ",
    "x",
    "null",
    'q" <t> & /s =e',
    "'`=\\",
    "\n",
    "\r\n",
    "\t",
    "é",
    "日本",
    "😀",
    "\ud83d",
    "\ude00",
    "a\ud800",
    "\u2028",
    "\u00a0",
    "\ufeff",
    "{{x}}",
    "&amp;",
    "</b>",
]
NUMBERS = [
    0,
    -0.0,
    1,
    -1,
    1.0,
    1.5,
    1e21,
    1e-7,
    0.000015,
    123456789012345678901234,
    2**53 + 1,
    1e16,
    0.1,
    10**400,
    -2.5e-8,
]
TEXTS = [
    "x",
    "é",
    "😀",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    " \n",
    "\n\n",
    "<&>",
    "\u00a0",
    "\u2028",
    "\x1c",
    "=",
    "}",
    "{ ",
    "'",
    "a b",
    ".",
    "\ufeff",
]


SCALARS: list[Callable[[random.Random], object]] = [
    lambda rng: rng.choice(STRINGS) + rng.choice(STRINGS),
    lambda rng: rng.choice(STRINGS),
    lambda rng: rng.choice(NUMBERS),
    lambda rng: rng.choice([True, False, None]),
    lambda rng: JSDate(rng.randint(0, 4 * 10**12)),
]


def random_value(rng: random.Random, depth: int) -> object:
    """A JSON-derived value built from the names templates use, so lookups hit."""
    roll = rng.random()
    if depth <= 0 or roll < 0.45:
        return rng.choice(SCALARS)(rng)
    if roll < 0.7:
        items = [random_value(rng, depth - 1) for _ in range(rng.randrange(4))]
        # A null element makes mustache.js throw on plain names inside its section.
        return [*items, None] if rng.random() < 0.1 else items
    return random_object(rng, depth - 1, rng.randrange(6))


def random_object(rng: random.Random, depth: int, size: int) -> dict[str, object]:
    """An object whose keys are names the templates use."""
    return {key: random_value(rng, depth) for key in rng.sample(KEYS, size)}


DELIMITERS = [("{{", "}}"), ("<%", "%>"), ("[[", "]]"), ("|", "|")]


class TemplateMaker:
    """Random templates: every tag kind, nesting, standalone lines, delimiter changes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.open, self.close = DELIMITERS[0]
        self.pieces = [self.text, self.variable, self.section, self.other_tag, self.newline]
        self.weights = [30, 25, 25, 15, 5]

    def template(self) -> str:
        self.open, self.close = DELIMITERS[0]
        text = self.body(3)
        if self.rng.random() < 0.04:
            # Occasionally broken, to compare error messages and positions too.
            text = self.rng.choice(
                [
                    text + "{{#a}}",
                    text + "{{/a}}",
                    "😀" + text + "{{a",
                    text + "{{=x=}}",
                    text.replace("{{/", "{{/z", 1),
                ]
            )
        return text

    def body(self, depth: int) -> str:
        count = self.rng.randrange(1, 6)
        return "".join(self.rng.choices(self.pieces, self.weights)[0](depth) for _ in range(count))

    def tag(self, inner: str) -> str:
        pad = self.rng.choice(["", "", " ", "  ", "\t"])
        return f"{self.open}{inner[:1]}{pad}{inner[1:]}{pad}{self.close}"

    def standalone(self, tag: str) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return tag
        before = rng.choice(["\n", "\r\n", "x\n"]) + rng.choice(["", " ", "\t "])
        return before + tag + rng.choice(["\n", "\r\n", " \n", "", " x\n"])

    def text(self, depth: int) -> str:
        return "".join(self.rng.choices(TEXTS, k=self.rng.randrange(1, 4)))

    def variable(self, depth: int) -> str:
        name = self.rng.choice(NAMES)
        kind = self.rng.randrange(3)
        if kind == 0:
            return f"{self.open}{{{name}}}{self.close}"
        return self.tag(f" {name}" if kind == 1 else f"&{name}")

    def section(self, depth: int) -> str:
        if depth <= 0:
            return self.variable(depth)
        name, sigil = self.rng.choice(NAMES), self.rng.choice("#^")
        # In this order: the body may change the delimiters the closing tag needs.
        opening = self.standalone(self.tag(f"{sigil}{name}"))
        body = self.body(depth - 1)
        return opening + body + self.standalone(self.tag(f"/{name}"))

    def other_tag(self, depth: int) -> str:
        if self.rng.random() < 0.5:
            new_open, new_close = self.rng.choice(DELIMITERS)
            tag = self.tag(f"={new_open} {new_close}=")
            self.open, self.close = new_open, new_close
            return self.standalone(tag)
        return self.standalone(self.tag(self.rng.choice(["! note ", "!\n", ">p"])))

    def newline(self, depth: int) -> str:
        return self.rng.choice(["\n", "\r\n", "  \n"])


def test_mustache_matches_mustache_js(mustache_js: Callable[..., list[object]]) -> None:
    """Random nasty templates and views render byte-identically to mustache.js 4.2.0."""
    rng = random.Random(8_2_0)
    maker = TemplateMaker(rng)
    cases: list[tuple[str, dict[str, object], str]] = []
    for _ in range(6_000):
        view = random_object(rng, 3, rng.randrange(4, 12))
        cases.append((maker.template(), view, rng.choice(["html", "html", "none"])))
    ours = [render_like_mustache_js(*case) for case in cases]
    theirs = mustache_js(cases)
    mismatches = [
        (case, mine, answer)
        for case, mine, answer in zip(cases, ours, theirs, strict=True)
        if not _js_equal(mine, answer)
    ]
    assert not mismatches, f"{len(mismatches)}/{len(cases)} differ, e.g. {mismatches[:3]}"
    errors = sum(isinstance(answer, dict) for answer in theirs)
    assert errors < len(cases) // 5, f"{errors} cases threw; the generator lost its coverage"
