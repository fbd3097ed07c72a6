"""Differential end to end: unleash-poller against Unleash's own webhook integration.

Both run as an operator would leave them: Unleash a plain default install (no UNLEASH_URL,
so its links say http://localhost:4242), the poller at its default settings (no
public_url, no escape), so what the poller learns from the server itself is what is tested.

The same templates (plus the default body and custom headers) are configured twice: as
Unleash integrations and as poller webhooks. A real mix of events is driven through the
admin API; then every (template, event) pair is compared byte for byte, bodies and the
Content-Type / Authorization / extra headers. Every template starts with `{{event.id}}|`
on both sides, which is how a delivery is matched to its event (Unleash delivers
asynchronously, out of order and sometimes twice).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import render_poller_config, require_real_unleash_harness
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.unleash import AdminClient, UnleashServer, unleash_package_dir

pytestmark = pytest.mark.e2e

PollerCli = Callable[..., "subprocess.CompletedProcess[str]"]  # the `poller_cli` fixture

DROPIN_VERSION = "8.2.0"
# Versions whose own webhook the poller is compared with at default settings (the big
# template x event-mix comparison runs on DROPIN_VERSION; the portable one on each).
PLAIN_VERSIONS = [
    v.strip()
    for v in os.environ.get("DROPIN_VERSIONS", "8.2.0,7.6.5,5.12.8").split(",")
    if v.strip()
]
ID_PREFIX = "{{event.id}}|"
ESCAPE_DESCRIPTION = 'q" <t> & /s =e'
ESCAPED_BY_UNLEASH = "q&quot; &lt;t&gt; &amp; &#x2F;s &#x3D;e"  # seen on the wire
NASTY_DESCRIPTION = (
    '<>&/=`\' "dq" back\\slash \\" café ✓ 🚀 ü line1\nline2\ttab \u2028sep {{not}} end'
)
UTC_DATE_SUFFIX = "GMT+0000 (Coordinated Universal Time)"

# Template bodies; each is sent as ID_PREFIX + body. Only BMP characters appear in them:
# the poller_config fixture writes TOML \u escapes, which cannot carry an astral character.
TEMPLATES: dict[str, str] = {
    "plain": (
        '{"type": "{{event.type}}", "by": "{{event.createdBy}}", "flag": "{{event.featureName}}",'
        ' "project": "{{event.project}}", "env": "{{event.environment}}",'
        ' "group": "{{event.groupType}}:{{event.groupId}}", "label": "{{event.label}}",'
        ' "summary": "{{event.summary}}", "name": "{{event.data.name}}"}'
    ),
    "json": '{"json": {{{eventJson}}}, "double": "{{eventJson}}", "amp": {{&eventJson}} }',
    "markdown": (
        '{"text": "{{eventMarkdown}}", "triple": "{{{eventMarkdown}}}",'
        ' "amp": "{{&eventMarkdown}}"}\n'
        "raw: {{eventMarkdown}}\n"
        # A raw description may hold a quote or a backslash: it flips what Unleash takes
        # to be "inside a JSON string" for the markdown that follows.
        'after {{{event.data.description}}} then "{{eventMarkdown}}" and {{eventMarkdown}}\n'
        '"{{event.data.description}}{{eventMarkdown}}"'
    ),
    "escapes": (
        "[[{{event.data.description}}]]|[[{{{event.data.description}}}]]"
        "|[[{{&event.data.description}}]]|[[{{ event.data.description }}]]"
        "|literal: <b> & \"q\" 'a' /s =e `b` \\n \\u00e9 é"
        "|{{event.data.title}}|{{event.data.value}}|{{event.data.url}}|{{event.preData.description}}"
    ),
    "tags": (
        "{{#event.tags}}{{type}}:{{value}};{{/event.tags}}{{^event.tags}}no-tags{{/event.tags}}"
        "|{{event.tags}}|{{{event.tags}}}|{{event.tags.length}}|{{event.tags.0.value}}"
        "|{{#event.tags.0}}first={{value}}{{/event.tags.0}}|{{event.data.type}}:{{event.data.value}}"
    ),
    "inverted": (
        "{{^event.environment}}no-env{{/event.environment}}"
        "{{#event.environment}}env={{.}}{{/event.environment}}"
        "|{{^event.preData}}no-preData{{/event.preData}}"
        "|{{^event.data}}no-data{{/event.data}}"
        "|{{^event.featureName}}no-flag{{/event.featureName}}"
        "|{{^event.project}}no-project{{/event.project}}"
        "|{{^event.data.constraints}}no-constraints{{/event.data.constraints}}"
        "|{{^event.data.description}}no-description{{/event.data.description}}"
        "|{{^event.groupType}}no-group{{/event.groupType}}"
        "|{{^event.nonexistent}}missing{{/event.nonexistent}}"
        "|{{^event.data.segments}}no-segments{{/event.data.segments}}"
        "|{{^event.tags}}no-tags{{/event.tags}}"
    ),
    "objects": (
        "{{#event.data}}name={{name}} type={{type}} evtype={{event.type}}{{/event.data}}"
        "|{{event.data}}|{{event.preData}}|{{event.tags}}|{{event.data.strategies}}"
        "|{{event.data.constraints}}|{{event.data.parameters}}|{{event.data.parameters.rollout}}"
        "|{{event.data.segments}}|{{event.data.projects}}|{{event.data.legalValues}}"
        "|{{#event.preData}}pre={{name}}/{{description}}{{/event.preData}}|{{event.preData.name}}"
    ),
    "scalars": (
        "enabled={{event.data.enabled}} stale={{event.data.stale}}"
        " archived={{event.data.archived}} impression={{event.data.impressionData}}"
        " uid={{event.createdByUserId}} id={{event.id}} sort={{event.data.sortOrder}}"
        " dataid={{event.data.id}} disabled={{event.data.disabled}} kept={{event.data.kept}}"
        " secure={{event.data.secure}} weight={{event.data.variants.0.weight}}"
        " sticky={{event.data.stickiness}} root={{event.data.rootRole}}\n"
        "{{#event.data.stale}}is-stale{{/event.data.stale}}"
        "{{^event.data.stale}}not-stale{{/event.data.stale}}\n"
        "{{#event.createdByUserId}}uid-section={{.}}{{/event.createdByUserId}}\n"
        "{{#event.data.sortOrder}}sort={{.}}{{/event.data.sortOrder}}"
        "{{^event.data.sortOrder}}sort-zero-or-missing{{/event.data.sortOrder}}\n"
        "{{#event.data.impressionData}}impression-on{{/event.data.impressionData}}"
    ),
    "dates": (
        "{{event.createdAt}}|{{{event.createdAt}}}|{{&event.createdAt}}"
        "|{{#event.createdAt}}section{{/event.createdAt}}|{{event.createdAt.length}}"
        "|{{event.data.createdAt}}|{{event.preData.archivedAt}}"
    ),
    "lengths": (
        "{{event.type.length}}|{{event.featureName.length}}|{{event.tags.length}}"
        "|{{event.data.strategies.length}}|{{event.data.constraints.length}}"
        "|{{event.data.description.length}}|{{event.data.constraints.0.values.length}}"
        "|{{event.data.constraints.0.values.3.length}}|{{event.data.name.length}}"
        "|{{event.data.constraints.0.values.1}}|{{event.type.0}}"
    ),
    "delimiters": (
        "{{=<% %>=}}<% event.type %>|<%{ event.data.description }%>|<%& event.featureName %>"
        "|{{not a tag}}|<%! a comment %>|<%#event.tags%><%value%>,<%/event.tags%>"
        "<%={{ }}=%>|{{event.project}}|{{=[[ ]]=}}[[event.environment]]|[[{ event.createdBy }]]"
    ),
    "standalone": (
        "\n"
        "{{! a standalone comment }}\n"
        "{{#event.tags}}\n"
        "  - {{type}}={{value}}\n"
        "{{/event.tags}}\n"
        "{{^event.tags}}\n"
        "  (no tags)\n"
        "{{/event.tags}}\n"
        "  {{> missing-partial}}\n"
        "\t{{#event.featureName}}  \n"
        "flag: {{.}}\n"
        "\t{{/event.featureName}}\n"
        "end {{! inline comment }} .\n"
        "{{#event.data}}\r\n"
        "crlf {{name}}\r\n"
        "{{/event.data}}\r\n"
        "  {{=<% %>=}}  \n"
        "<%#event.environment%>\n"
        "env: <%.%>\n"
        "<%/event.environment%>\n"
        "done"
    ),
    "numbers": (
        "{{event.data.float}}|{{event.data.big}}|{{event.data.bigint}}|{{event.data.small}}"
        "|{{event.data.neg}}|{{event.data.exp}}|{{event.data.int_float}}|{{event.data.huge}}"
        "|{{event.data.tiny}}|{{event.data.prec}}|{{event.data.e15}}|{{event.data.max}}\n"
        "{{event.data.nested}}|{{event.data.mixed}}|{{#event.data.mixed}}[{{.}}]{{/event.data.mixed}}"
        "|{{#event.data.nested}}({{.}}){{/event.data.nested}}|{{event.data.mixed.3}}"
        "|{{event.data.nested.0.1.1}}|{{event.preData.nested.deep.1.x.0}}\n"
        "{{event.data.ukey.ключ}}|{{#event.data.ukey}}{{ключ}}{{/event.data.ukey}}"
        "|{{event.data.empty_obj}}|{{#event.data.empty_obj}}obj-truthy{{/event.data.empty_obj}}"
        "|{{^event.data.empty_arr}}arr-falsy{{/event.data.empty_arr}}"
        "|{{#event.data.zero}}zero-truthy{{/event.data.zero}}"
        "{{^event.data.zero}}zero-falsy{{/event.data.zero}}"
        "|{{#event.data.empty_str}}s{{/event.data.empty_str}}"
        "{{^event.data.empty_str}}empty-str-falsy{{/event.data.empty_str}}"
        "|{{event.data.batchIndex}}"
    ),
    "arrays": (
        "{{#event.data.constraints}}{{contextName}} {{operator}} [{{#values}}<{{.}}>{{/values}}]"
        " value={{value}} inverted={{inverted}} ci={{caseInsensitive}};{{/event.data.constraints}}"
        "|{{#event.data.projects}}({{.}}){{/event.data.projects}}"
        "|{{#event.data.segments}}#{{.}}{{/event.data.segments}}"
        "|{{event.data.constraints.0.values}}"
        "|{{#event.data.legalValues}}{{value}}={{description}};{{/event.data.legalValues}}"
        "|{{#event.data.variants}}{{name}}:{{weight}}:{{payload.value}};{{/event.data.variants}}"
        "|{{#event.data.parameters}}{{name}}{{type}}{{/event.data.parameters}}"
    ),
}


@dataclass(frozen=True)
class Hook:
    """One template configured on both sides (None: Unleash's default JSON body)."""

    name: str
    template: str | None
    content_type: str | None = None
    authorization: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def compared_headers(self) -> list[str]:
        """Header names whose values must match: Content-Type, Authorization, extras."""
        names = ["content-type", "authorization"]
        names += [name.lower() for name in self.headers if name.lower() not in names]
        return names


HOOKS: tuple[Hook, ...] = (
    *(Hook(name, ID_PREFIX + body) for name, body in TEMPLATES.items()),
    Hook("default", None),
    Hook(
        "default-headers",
        None,
        content_type="application/vnd.dropin+json; charset=utf-8",
        authorization="Bearer dropin-token",
        # Keys differing only in case both stay in Unleash's object; fetch joins them.
        headers={"X-Team": "platform", "X-Trace-Id": "t-1", "X-Empty": "", "x-team": "second"},
    ),
    Hook(
        "headers-override",
        ID_PREFIX + '{{event.type}} "{{eventMarkdown}}"',
        content_type="text/plain",
        authorization="Basic Zm9vOmJhcg==",
        # The same name replaces (JavaScript object merge); another case is kept as well.
        headers={"Content-Type": "application/x-override", "authorization": "Token lower"},
    ),
)


def unique(prefix: str) -> str:
    """A flag name / receiver path component no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", params=PLAIN_VERSIONS, ids=lambda v: f"plain-unleash-{v}")
def plain_unleash(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UnleashServer]:
    """A real Unleash started as a default install: no UNLEASH_URL."""
    require_real_unleash_harness()
    version: str = request.param
    log_dir = tmp_path_factory.mktemp(f"plain-unleash-{version}-logs", numbered=True)
    with UnleashServer(version, log_dir=log_dir, default_unleash_url=True) as server:
        yield server


def default_poller_config(
    directory: Path, server: UnleashServer, webhooks: Sequence[Mapping[str, object]], start: int
) -> Path:
    """The poller's config with nothing but url, token, state and the webhooks."""
    path = directory / "poller.toml"
    path.touch(mode=0o600)
    path.write_text(
        render_poller_config(
            unleash_url=server.url,
            token=server.admin_token,
            state_path=directory / "state.sqlite3",
            webhooks=webhooks,
            start_from=start,
        )
    )
    return path


def delivered_id(body: bytes) -> int:
    """The event id a delivery carries: the template's id prefix, or the default JSON's id."""
    if body.startswith(b"{"):
        return int(json.loads(body)["id"])
    return int(body.split(b"|", 1)[0])


def by_id(requests: Iterable[RecordedRequest]) -> dict[int, list[RecordedRequest]]:
    grouped: dict[int, list[RecordedRequest]] = {}
    for request in requests:
        grouped.setdefault(delivered_id(request.body), []).append(request)
    return grouped


def settle(
    receiver: Receiver, paths: Sequence[str], ids: set[int], *, timeout_s: float, quiet_s: float
) -> None:
    """Wait until every path got every id in `ids`, or nothing arrived on any of them for
    `quiet_s` (Unleash sends some events to no integration), or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        requests = {path: receiver.requests(path) for path in paths}
        if all(ids <= set(by_id(got)) for got in requests.values()):
            return
        count = sum(len(got) for got in requests.values())
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > quiet_s:
            return
        time.sleep(0.2)


def header_values(request: RecordedRequest, name: str) -> list[str]:
    return [value for key, value in request.headers if key.lower() == name]


def dispatched_event_types(version: str) -> list[str]:
    """Every event type Unleash hands to integrations (its IEventTypes): the API accepts
    any of them on a webhook, not only the ones its UI offers."""
    script = (
        "import('./node_modules/unleash-server/dist/lib/events/index.js')"
        ".then((m) => console.log(JSON.stringify(m.IEventTypes)))"
    )
    completed = subprocess.run(
        ["node", "-e", script],
        cwd=unleash_package_dir(version),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    types: list[str] = json.loads(completed.stdout)
    return types


def node_time_zone() -> tuple[str, int]:
    """The zone and UTC offset (minutes) of a node started like the harness's Unleash."""
    completed = subprocess.run(
        [
            "node",
            "-e",
            "console.log(JSON.stringify([Intl.DateTimeFormat().resolvedOptions().timeZone,"
            " new Date().getTimezoneOffset()]))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=dict(os.environ),
    )
    zone, offset = json.loads(completed.stdout)
    return str(zone), int(offset)


# --------------------------------------------------------------------------- event mix


def _feature_path(flag: str, project: str = "default") -> str:
    return f"/api/admin/projects/{project}/features/{flag}"


def _strategy_body(flag: str, segment_id: int, *, update: bool) -> dict[str, Any]:
    constraints: list[dict[str, Any]] = [
        {
            "contextName": "userId",
            "operator": "IN",
            "values": ['a"b', "<x>", "&amp;", "ü🚀", "back\\slash", "=`'/"],
            "caseInsensitive": False,
            "inverted": False,
        },
        {
            "contextName": "appName",
            "operator": "STR_CONTAINS",
            "values": ["Ünïcode", "x/y"],
            "caseInsensitive": True,
            "inverted": True,
        },
        {
            "contextName": "currentTime",
            "operator": "DATE_AFTER",
            "value": "2024-01-01T00:00:00.000Z",
        },
        {"contextName": "userId", "operator": "NUM_GT", "value": "5"},
    ]
    body: dict[str, Any] = {
        "name": "flexibleRollout",
        "title": 'Nasty "title" <b>&',
        "constraints": constraints,
        "parameters": {"rollout": "33", "stickiness": "default", "groupId": flag},
        "segments": [segment_id],
    }
    if update:
        body["title"] = "Renamed ✓ 'title'"
        body["constraints"] = [*constraints[1:], {**constraints[0], "values": ["<only>"]}]
        body["parameters"] = {"rollout": "66", "stickiness": "userId", "groupId": f"{flag}-g"}
        body["segments"] = []
        body["variants"] = [
            {
                "name": "v1.beta_~",
                "weight": 1000,
                "weightType": "variable",
                "stickiness": "default",
                "payload": {"type": "json", "value": '{"a": "<b>", "c": "\\u00e9"}'},
            }
        ]
    return body


def drive_event_mix(admin: AdminClient) -> dict[str, str]:
    """Put flags, strategies, tags, segments, tokens and more through real admin calls."""
    flags = {
        "escape": unique("dropin-esc"),
        "nasty": unique("dropin-nasty"),
        "empty": unique("dropin-empty"),
        "dotted": unique("dropin.dot_under~tilde"),
    }
    admin.create_feature(flags["escape"], description=ESCAPE_DESCRIPTION)
    admin.create_feature(flags["nasty"], description=NASTY_DESCRIPTION)
    admin.create_feature(flags["empty"], description="")
    admin.create_feature(flags["dotted"], description="plain", type="experiment")
    admin.update_feature(flags["escape"], description='second <b>desc</b> & "more"')
    admin.update_feature(flags["dotted"], type="operational")
    admin.request(
        "PATCH",
        _feature_path(flags["nasty"]),
        [{"op": "replace", "path": "/impressionData", "value": True}],
    )

    for environment in ("development", "production"):
        admin.set_environment_enabled(flags["escape"], environment, True)
    segment = admin.create_segment(
        unique("seg<&>"), values=['a"b', "<x>", "🚀"], description='seg "d" <&> /'
    )
    strategies = f"{_feature_path(flags['nasty'])}/environments/production/strategies"
    rollout = admin.request(
        "POST", strategies, _strategy_body(flags["nasty"], segment, update=False)
    )
    admin.request(
        "PUT",
        f"{strategies}/{rollout['id']}",
        _strategy_body(flags["nasty"], segment, update=True),
    )
    development = f"{_feature_path(flags['nasty'])}/environments/development/strategies"
    for strategy, parameter, before, after in (
        ("remoteAddress", "IPs", "10.0.0.1,10.0.0.2", "10.0.0.3"),
        ("applicationHostname", "hostNames", "a.example,b<c>", "d&e.example"),
    ):
        added = admin.request(
            "POST",
            development,
            {"name": strategy, "constraints": [], "parameters": {parameter: before}},
        )
        admin.request(
            "PUT",
            f"{development}/{added['id']}",
            {"name": strategy, "constraints": [], "parameters": {parameter: after}},
        )
    admin.delete_strategy(flags["nasty"], "production", str(rollout["id"]))
    for environment in ("development", "production"):
        admin.set_environment_enabled(flags["escape"], environment, False)

    admin.ensure_tag_type("team")
    admin.tag_feature(flags["nasty"], 'a&b <c> "d"')
    admin.tag_feature(flags["nasty"], "platform", tag_type="team")
    admin.untag_feature(flags["nasty"], 'a&b <c> "d"')
    admin.set_stale(flags["escape"], True)
    admin.set_stale(flags["escape"], False)
    admin.request(
        "POST",
        f"{_feature_path(flags['escape'])}/link",
        {"url": "https://example.com/?a=1&b=<2>", "title": 'Link "q" <&>'},
    )
    admin.archive_feature(flags["dotted"])
    admin.revive_feature(flags["dotted"])
    admin.archive_feature(flags["empty"])
    admin.request("DELETE", f"/api/admin/archive/{flags['empty']}")
    admin.request(
        "POST",
        f"{_feature_path(flags['escape'])}/lifecycle/complete",
        {"status": "kept", "statusValue": "v1"},
    )

    admin.update_segment(segment, unique("seg-renamed"), values=["b@example.com", "ü"])
    admin.create_api_token(unique("token"))
    admin.request(
        "POST",
        "/api/admin/context",
        {
            "name": unique("ctx"),
            "description": 'ctx "d" <&>',
            "legalValues": [{"value": "a<b>&", "description": 'q"'}, {"value": "plain"}],
            "stickiness": False,
        },
    )
    admin.request(
        "POST",
        "/api/admin/strategies",
        {
            "name": unique("strat"),
            "description": 'strategy "d" <&>',
            "parameters": [
                {"name": "p<1>", "type": "string", "description": "d", "required": False}
            ],
        },
    )
    admin.request(
        "POST",
        "/api/admin/user-admin",
        {
            "email": f"{unique('user')}@example.com",
            "name": 'User "q" <&>',
            "rootRole": 3,
            "sendEmail": False,
        },
    )
    # Open-source Unleash refuses new projects; the event mix then goes without them.
    project = admin.create_project(unique("proj"), description='proj "d" <&>')
    if project is not None:
        admin.create_feature(unique("dropin-in-project"), project=project, description="p")
    return flags


# Values no admin call produces but Unleash's event store holds and hands to integrations
# as they are (JSON numbers become JavaScript doubles).
CRAFTED_NUMBERS: dict[str, Any] = {
    "float": 0.1,
    "big": 1e21,
    "bigint": 12345678901234567890,
    "small": 1e-7,
    "neg": -0.0,
    "exp": 2.5e-3,
    "int_float": 3.0,
    "huge": 1.7976931348623157e308,
    "tiny": 5e-324,
    "prec": 0.30000000000000004,
    "e15": 123456789012345.6,
    "max": 9007199254740993,
    "nested": [[1, [2, "x"]], [], {"a": None}],
    "mixed": [None, True, False, 1.5, "s", {"k": "v"}],
    "ukey": {"ключ": "значение <&>", "e🚀": "🚀"},
    "empty_obj": {},
    "empty_arr": [],
    "zero": 0,
    "empty_str": "",
}


def insert_crafted_events(unleash: UnleashServer, flag: str) -> None:
    """Rows as Unleash's own writers could store them, through SQL (see insert_events):
    odd numbers and nesting, a feature event without a project, user names holding
    Mustache tags (Unleash's markdown renders them as a template), odd strategy changes."""
    db = unleash.db
    db.insert_events(
        1,
        type="feature-updated",
        feature_name=flag,
        data=CRAFTED_NUMBERS,
        pre_data={"nested": {"deep": [1, {"x": [True]}]}},
        tags=[{"type": "simple", "value": "crafted<&>"}, {"type": "team", "value": "b"}],
    )
    db.insert_events(
        1, type="feature-environment-enabled", project=None, feature_name=unique("crafted")
    )
    db.insert_events(1, type="feature-archived", project=None, feature_name=unique("crafted"))
    db.insert_events(
        1, type="tag-type-created", project=None, created_by='crafted {{b}}{{event.type}} "q" <&>'
    )
    db.insert_events(
        1,
        type="feature-strategy-update",
        environment="production",
        feature_name=flag,
        data={"name": "remoteAddress", "title": "", "parameters": {"IPs": ""}},
        pre_data={"name": "remoteAddress", "parameters": {"IPs": "1.1.1.1,2.2.2.2"}},
    )
    db.insert_events(
        1,
        type="feature-strategy-update",
        environment="development",
        feature_name=flag,
        data={
            "name": "default",
            "constraints": [{"contextName": "x", "operator": "SEMVER_GT", "inverted": True}],
            "segments": [3, 4],
        },
        pre_data={"name": "default", "title": "t", "constraints": [], "segments": []},
    )
    # Not here: a user name with an unclosed section ("eve{{#x}}"). Unleash's formatter
    # throws on it, so Unleash sends that event to no integration, and its event search
    # answers 500 for every page holding it, which would break every later test.


# --------------------------------------------------------------------------- both sides


@contextlib.contextmanager
def unleash_integrations(
    admin: AdminClient,
    receiver: Receiver,
    hooks: Sequence[Hook],
    types: Sequence[str],
    path: Callable[[str, Hook], str],
) -> Iterator[None]:
    """Unleash's own webhook integrations for `hooks`, live when this enters and disabled
    when it exits (else they would receive every later test's events)."""
    settings: list[dict[str, Any]] = [
        {
            "url": receiver.url(path("unleash", hook)),
            "events": types,
            "body_template": hook.template,
            "content_type": hook.content_type,
            "authorization": hook.authorization,
            "custom_headers": hook.headers or None,
        }
        for hook in hooks
    ]
    addon_ids = [admin.create_webhook(**setting) for setting in settings]
    try:
        # Unleash caches its list of integrations for up to 60 s: probe until all are live.
        deadline = time.monotonic() + 90
        while True:
            admin.create_feature(unique("probe"))
            try:
                for hook in hooks:
                    receiver.wait_for(1, path("unleash", hook), timeout_s=5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        yield
    finally:
        # Disabled, not deleted: Unleash 8.2.0 crashes (an unhandled foreign-key error) when
        # a delivery still in flight to an integration finishes after the integration is gone.
        for addon_id, setting in zip(addon_ids, settings, strict=True):
            admin.update_webhook(addon_id, **setting, enabled=False)


def poller_webhook(hook: Hook, url: str, types: Sequence[str]) -> dict[str, object]:
    """The poller's [[webhooks]] table for `hook` (default escape: Unleash's)."""
    table: dict[str, object] = {"name": hook.name, "url": url, "events": list(types)}
    optional = {
        "body_template": hook.template,
        "content_type": hook.content_type,
        "authorization": hook.authorization,
        "headers": dict(hook.headers) or None,
    }
    table.update({key: value for key, value in optional.items() if value is not None})
    return table


# --------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    pairs: int = 0
    identical: int = 0
    neither_sent: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, problem: str | None) -> None:
        self.pairs += 1
        if problem is None:
            self.identical += 1
        else:
            self.problems.append(problem)


def _show(body: bytes, limit: int = 3000) -> str:
    text = body.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "…")


def body_difference(theirs: bytes, ours: bytes) -> str:
    offset = next(
        (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
        min(len(theirs), len(ours)),
    )
    return (
        f"  first difference at byte {offset}: unleash {theirs[offset : offset + 60]!r}"
        f" / poller {ours[offset : offset + 60]!r}\n"
        f"  unleash: {_show(theirs)}\n  poller:  {_show(ours)}"
    )


def _delivery_problem(theirs: list[RecordedRequest], ours: list[RecordedRequest]) -> str | None:
    """What is wrong with how often each side sent the event, if anything."""
    if not theirs or not ours:
        return (
            f"delivered by unleash {len(theirs)}x, by the poller {len(ours)}x"
            + (f"\n  unleash: {_show(theirs[0].body)}" if theirs else "")
            + (f"\n  poller:  {_show(ours[0].body)}" if ours else "")
        )
    if len(ours) > 1:
        return f"the poller delivered it {len(ours)} times"
    if len({request.body for request in theirs}) > 1:
        return f"unleash itself sent {len(theirs)} different bodies"
    return None


def compare_pair(
    hook: Hook, event: Mapping[str, Any], theirs: list[RecordedRequest], ours: list[RecordedRequest]
) -> str | None:
    """None when the poller's delivery equals Unleash's (or neither sent one); else what differs."""
    where = f"[{hook.name}] event {event['id']} {event['type']}"
    if not theirs and not ours:
        return None  # both left it out (Unleash's formatter throws on some events)
    problem = _delivery_problem(theirs, ours)
    if problem is None and ours[0].body != theirs[0].body:
        problem = f"bodies differ\n{body_difference(theirs[0].body, ours[0].body)}"
    for name in hook.compared_headers() if problem is None else ():
        if header_values(ours[0], name) != header_values(theirs[0], name):
            problem = (
                f"header {name}: unleash {header_values(theirs[0], name)!r},"
                f" poller {header_values(ours[0], name)!r}"
            )
            break
    return None if problem is None else f"{where}: {problem}"


def test_every_template_and_event_matches_unleash_own_webhook_integration(
    plain_unleash: UnleashServer,
    receiver: Receiver,
    tmp_path: Path,
    poller_cli: PollerCli,
) -> None:
    """For every template x real event, the poller's body and headers equal Unleash's."""
    unleash = plain_unleash
    if unleash.version != DROPIN_VERSION:
        pytest.skip(f"the full event mix targets Unleash {DROPIN_VERSION}, not {unleash.version}")
    admin = unleash.admin()
    started = time.monotonic()
    zone, offset = node_time_zone()
    in_utc = offset == 0 and zone in ("UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu")
    # mustache.js prints a Date in the Unleash process's zone; the poller prints UTC.
    hooks = [hook for hook in HOOKS if in_utc or hook.name != "dates"]
    print(f"\nDROPIN: Unleash runs in time zone {zone} (UTC offset {-offset} min)")
    if not in_utc:
        print("DROPIN: NOT UTC - the `dates` template is left out of the comparison")

    types = sorted(set(admin.webhook_event_types()) | set(dispatched_event_types(unleash.version)))
    base = "/" + unique("dropin")

    def path(side: str, hook: Hook) -> str:
        return f"{base}/{side}/{hook.name}"

    with unleash_integrations(admin, receiver, hooks, types, path):
        live_s = time.monotonic() - started
        start = admin.latest_event_id()
        flags = drive_event_mix(admin)
        insert_crafted_events(unleash, flags["nasty"])
        events = [e for e in admin.all_events(after_id=start) if e["type"] in types]
        ids = {e["id"] for e in events}
        config = default_poller_config(
            tmp_path,
            unleash,
            [poller_webhook(hook, receiver.url(path("poller", hook)), types) for hook in hooks],
            start,
        )
        poller_cli("run", "-c", config, "--once")
        settle(receiver, [path("unleash", hook) for hook in hooks], ids, timeout_s=45, quiet_s=5)
    seen_types = sorted({e["type"] for e in events})
    assert len(events) >= 40, seen_types

    comparison = Comparison()
    for hook in hooks:
        theirs = by_id(receiver.requests(path("unleash", hook)))
        ours = by_id(receiver.requests(path("poller", hook)))
        extra = sorted(set(ours) - ids)
        if extra:
            comparison.problems.append(
                f"[{hook.name}] the poller sent events it should not: {extra}"
            )
        for event in events:
            theirs_now, ours_now = theirs.get(event["id"], []), ours.get(event["id"], [])
            comparison.neither_sent += not theirs_now and not ours_now
            comparison.add(compare_pair(hook, event, theirs_now, ours_now))

    sample = {
        side: sorted({k.lower() for k, _ in receiver.requests(path(side, hooks[-1]))[0].headers})
        for side in ("unleash", "poller")
    }
    print(
        f"DROPIN: {len(hooks)} templates x {len(events)} events of {len(seen_types)} types:"
        f" {', '.join(seen_types)}"
    )
    print(f"DROPIN: header names on the wire (not compared): {sample}")
    print(
        f"DROPIN: integrations live after {live_s:.0f} s, whole test"
        f" {time.monotonic() - started:.0f} s"
    )
    print(f"DROPIN: compared {comparison.pairs} pairs, identical {comparison.identical}")
    print(
        f"FIGURES: unleash {unleash.version} default install, poller defaults:"
        f" {comparison.identical}/{comparison.pairs} identical (full event mix)"
    )
    print(f"DROPIN: of the identical pairs, {comparison.neither_sent} were sent by neither side")
    for problem in comparison.problems:
        print(f"DROPIN MISMATCH {problem}")
    assert comparison.pairs == len(hooks) * len(events)
    assert not comparison.problems, (
        f"{comparison.pairs - comparison.identical} of {comparison.pairs} pairs differ; "
        f"first problem: {comparison.problems[0]}"
    )
    assert comparison.identical == comparison.pairs

    # The escape example from Unleash's wire, on both sides.
    [created] = [
        e for e in events if e["type"] == "feature-created" and e["featureName"] == flags["escape"]
    ]
    escapes = next(hook for hook in hooks if hook.name == "escapes")
    for side in ("unleash", "poller"):
        [request] = by_id(receiver.requests(path(side, escapes)))[created["id"]][:1]
        assert f"[[{ESCAPED_BY_UNLEASH}]]".encode() in request.body, (side, request.body)
    if in_utc:
        dates = next(hook for hook in hooks if hook.name == "dates")
        first = by_id(receiver.requests(path("unleash", dates)))[created["id"]][0]
        assert UTC_DATE_SUFFIX.encode() in first.body, first.body


# Templates whose fields every version's events carry; with the default body and headers.
PORTABLE = ("plain", "json", "markdown", "escapes", "tags", "inverted", "objects", "scalars")


def drive_portable_mix(admin: AdminClient) -> None:
    """Admin calls every version from 5.12.8 to 8.2.0 answers alike."""
    escape, nasty = unique("plain-esc"), unique("plain-nasty")
    admin.create_feature(escape, description=ESCAPE_DESCRIPTION)
    admin.create_feature(nasty, description=NASTY_DESCRIPTION)
    admin.update_feature(escape, description='second <b>desc</b> & "more"')
    for environment in ("development", "production"):
        admin.set_environment_enabled(escape, environment, True)
        admin.set_environment_enabled(escape, environment, False)
    admin.tag_feature(nasty, 'a&b <c> "d"')
    admin.set_stale(escape, True)
    admin.archive_feature(nasty)
    admin.revive_feature(nasty)


def test_default_settings_match_each_version_own_webhook(
    plain_unleash: UnleashServer, receiver: Receiver, tmp_path: Path, poller_cli: PollerCli
) -> None:
    """On each version's default install, the poller at default settings sends the bodies
    that version's own webhook sends: its links (ui-config's unleashUrl), its escaping
    and its template context (no eventMarkdown on 5.x)."""
    unleash = plain_unleash
    admin = unleash.admin()
    hooks = [h for h in HOOKS if h.name in PORTABLE or h.template is None or "override" in h.name]
    types = admin.webhook_event_types()
    base = "/" + unique(f"plain-{unleash.version}")

    def path(side: str, hook: Hook) -> str:
        return f"{base}/{side}/{hook.name}"

    with unleash_integrations(admin, receiver, hooks, types, path):
        start = admin.latest_event_id()
        drive_portable_mix(admin)
        events = [e for e in admin.all_events(after_id=start) if e["type"] in types]
        ids = {e["id"] for e in events}
        config = default_poller_config(
            tmp_path,
            unleash,
            [poller_webhook(hook, receiver.url(path("poller", hook)), types) for hook in hooks],
            start,
        )
        run = poller_cli("run", "-c", config, "--once")
        settle(receiver, [path("unleash", hook) for hook in hooks], ids, timeout_s=45, quiet_s=5)
    assert len(events) >= 8, [e["type"] for e in events]

    # 5.x and 6.x differ on the wire in two ways that are not rendering (facts file): they
    # send `Authorization: undefined` when none is set, and header names that differ only in
    # case as separate fields (8.x joins them with ", ", as HTTP defines them equal). Those
    # are counted apart; bodies and every other header value must be equal.
    legacy = unleash.version.split(".")[0] in ("5", "6")
    tolerated: dict[str, int] = {"Authorization: undefined": 0, "same-name headers joined": 0}
    comparison = Comparison()
    for hook in hooks:
        theirs = by_id(receiver.requests(path("unleash", hook)))
        ours = by_id(receiver.requests(path("poller", hook)))
        for event in events:
            theirs_now, ours_now = theirs.get(event["id"], []), ours.get(event["id"], [])
            if not legacy:
                comparison.add(compare_pair(hook, event, theirs_now, ours_now))
                continue
            if not theirs_now and not ours_now:
                comparison.add(None)  # both left it out
                continue
            where = f"[{hook.name}] event {event['id']} {event['type']}"
            problem = _delivery_problem(theirs_now, ours_now)
            if problem is None and ours_now[0].body != theirs_now[0].body:
                body = body_difference(theirs_now[0].body, ours_now[0].body)
                problem = f"bodies differ\n{body}"
            problem = f"{where}: {problem}" if problem else None
            for name in hook.compared_headers() if problem is None else ():
                mine = header_values(ours_now[0], name)
                unleash_own = header_values(theirs_now[0], name)
                if mine == unleash_own:
                    continue
                if name == "authorization" and (unleash_own, mine) == (["undefined"], []):
                    tolerated["Authorization: undefined"] += 1
                elif ", ".join(mine) == ", ".join(unleash_own):
                    tolerated["same-name headers joined"] += 1
                else:
                    problem = f"{where}: header {name}: unleash {unleash_own!r}, poller {mine!r}"
                    break
            comparison.add(problem)
    if legacy:
        print(f"DROPIN {unleash.version}: wire differences outside rendering: {tolerated}")
    print(
        f"FIGURES: unleash {unleash.version} default install, poller defaults:"
        f" {comparison.identical}/{comparison.pairs} identical"
        f" ({len(hooks)} templates x {len(events)} events)"
    )
    for problem in comparison.problems:
        print(f"DROPIN MISMATCH {problem}")
    chosen = [line for line in run.stderr.splitlines() if "render.defaults" in line]
    print(f"DROPIN {unleash.version}: {chosen}")
    assert len(chosen) == 1  # one line says what was chosen and why
    assert f'"unleash_version": "{unleash.version}"' in chosen[0]
    assert comparison.pairs == len(hooks) * len(events)
    assert not comparison.problems, (
        f"{len(comparison.problems)} of {comparison.pairs} pairs differ;"
        f" first: {comparison.problems[0]}"
    )
