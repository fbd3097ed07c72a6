"""eventMarkdown: the text Unleash 8.2.0's FeatureEventFormatterMd writes, byte for byte."""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from poller.markdown import (
    FORMATTED_EVENT_TYPES,
    UnformattableEventError,
    format_event_markdown,
)
from tests.support.node import require_node, run_json

URL = "https://unleash.example.com"
TESTS_DIR = Path(__file__).resolve().parent
UNLEASH_LIB = TESTS_DIR / "unleash" / "8.2.0" / "node_modules" / "unleash-server" / "dist" / "lib"
FORMATTER_JS = UNLEASH_LIB / "addons" / "feature-event-formatter-md.js"
EVENT_MAP_JS = UNLEASH_LIB / "addons" / "feature-event-formatter-md-events.js"
EVENT_TYPES_JS = UNLEASH_LIB / "events" / "index.js"

Event = dict[str, object]
Outcome = dict[str, str]


def api_event(event_type: str, **fields: object) -> Event:
    """An event shaped as the admin API serves it: every column present, null when unset."""
    event: Event = {
        "id": 101,
        "type": event_type,
        "createdBy": "alice@example.com",
        "createdAt": "2026-11-28T13:08:00.123Z",
        "createdByUserId": 3,
        "data": None,
        "preData": None,
        "tags": [],
        "featureName": None,
        "project": None,
        "environment": None,
    }
    event.update(fields)
    return event


FLAG = f"[new-feature]({URL}/projects/my-project/features/new-feature)"
PROJECT = f"[my-project]({URL}/projects/my-project)"
IN_FLAG = {"featureName": "new-feature", "project": "my-project", "environment": "production"}


def rollout(**parameters: object) -> dict[str, object]:
    return {
        "name": "flexibleRollout",
        "constraints": [],
        "parameters": {
            "groupId": "new-feature",
            "rollout": "67",
            "stickiness": "default",
            **parameters,
        },
    }


TABLE: list[tuple[str, Event, str]] = [
    (
        "flag created",
        api_event("feature-created", **IN_FLAG),
        f"*alice@example.com* created *{FLAG}* in project *{PROJECT}*",
    ),
    (
        "flag created without project or name",
        api_event("feature-created"),
        "*alice@example.com* created ** in project **",
    ),
    (
        "flag archived names the flag without a link",
        api_event("feature-archived", **IN_FLAG),
        f"*alice@example.com* archived *new-feature* in project *{PROJECT}*",
    ),
    (
        "rollout changed",
        api_event(
            "feature-strategy-update", data=rollout(rollout="32"), preData=rollout(), **IN_FLAG
        ),
        f"*alice@example.com* updated *{FLAG}* in project *{PROJECT}* by updating strategy "
        "*flexibleRollout* in *production* rollout from 67% to 32%",
    ),
    (
        "stickiness and groupId changed",
        api_event(
            "feature-strategy-update",
            data=rollout(stickiness="random", groupId="g"),
            preData=rollout(),
            **IN_FLAG,
        ),
        f"*alice@example.com* updated *{FLAG}* in project *{PROJECT}* by updating strategy "
        "*flexibleRollout* in *production* stickiness from default to random;"
        " groupId from new-feature to g",
    ),
    (
        "constraint added to the default strategy",
        api_event(
            "feature-strategy-update",
            preData={"name": "default", "constraints": []},
            data={
                "name": "default",
                "constraints": [
                    {"contextName": "appName", "operator": "IN", "values": ["x", "y"]},
                    {
                        "contextName": "v",
                        "operator": "SEMVER_GT",
                        "value": "1.2.3",
                        "inverted": True,
                    },
                ],
            },
            **IN_FLAG,
        ),
        f"*alice@example.com* updated *{FLAG}* in project *{PROJECT}* by updating strategy "
        "*default* in *production* constraints from empty set of constraints to "
        "[appName is one of (x,y), v not is a SemVer greater than 1.2.3]",
    ),
    (
        "IPs set for the first time",
        api_event(
            "feature-strategy-update",
            data={"name": "remoteAddress", "parameters": {"IPs": "127.0.0.1"}},
            **IN_FLAG,
        ),
        f"*alice@example.com* updated *{FLAG}* in project *{PROJECT}* by updating strategy "
        "*remoteAddress* in *production* IPs to [127.0.0.1]",
    ),
    (
        "segments changed on a strategy without a dedicated text",
        api_event(
            "feature-strategy-update",
            data={"name": "userWithId", "segments": [1, 2]},
            preData={"name": "userWithId", "title": "Beta users"},
            **IN_FLAG,
        ),
        f"*alice@example.com* updated *{FLAG}* in project *{PROJECT}* by updating strategy "
        "*Beta users* in *production*",
    ),
    (
        "change request link with flag and environment",
        api_event("change-request-approved", data={"changeRequestId": 12}, **IN_FLAG),
        f"*alice@example.com* approved change request *[#12]({URL}/projects/my-project/"
        f"change-requests/12)* for feature flag *{FLAG}* in the *production* environment"
        f" in project *{PROJECT}*",
    ),
    (
        "change request id only in preData, no project: no link",
        api_event("change-request-applied", preData={"changeRequestId": 12}),
        "*alice@example.com* applied change request ",
    ),
    (
        "unknown type falls back to a generic sentence",
        api_event("feature-link-added"),
        "*alice@example.com* triggered *feature-link-added*",
    ),
    (
        "the fallback sentence is itself a Mustache template",
        api_event("x", createdBy="{{event.project}}/{{#event}}{{project}}{{/event}}", project="p"),
        "*p/p* triggered *x*",
    ),
    (
        "the fallback sees createdAt as a Date",
        api_event("x", createdBy="{{event.createdAt}}"),
        "*Sat Nov 28 2026 13:08:00 GMT+0000 (Coordinated Universal Time)* triggered *x*",
    ),
    (
        "search-endpoint extras are not part of the event",
        api_event("x", createdBy="{{event.label}}{{event.summary}}", label="L", summary="S"),
        "** triggered *x*",
    ),
    (
        "nasty strings pass through unescaped",
        api_event("segment-created", createdBy="q\" <t> & /s =e `'", data={"name": "naïve 🚀 \\"}),
        "*q\" <t> & /s =e `'* created segment *naïve 🚀 \\*",
    ),
]


@pytest.mark.parametrize(("event", "expected"), [pytest.param(e, t, id=i) for i, e, t in TABLE])
def test_formats_like_unleash(event: Event, expected: str) -> None:
    """Each table event gets the exact sentence Unleash's formatter writes for it."""
    assert format_event_markdown(event, URL) == expected


UNFORMATTABLE: list[tuple[str, Event]] = [
    (
        "IPs strategy without parameters",
        api_event("feature-strategy-update", data={"name": "remoteAddress"}, preData={"name": "x"}),
    ),
    (
        "constraints that are null",
        api_event("feature-strategy-update", data={"name": "default", "constraints": None}),
    ),
    (
        "constraint values that are a string",
        api_event(
            "feature-strategy-update",
            data={
                "name": "default",
                "constraints": [{"contextName": "a", "operator": "IN", "values": "x"}],
            },
        ),
    ),
    ("type that names an Object.prototype member", api_event("constructor")),
    ("fallback text that is not a valid template", api_event("x", createdBy="{{oops")),
]


@pytest.mark.parametrize("event", [pytest.param(e, id=i) for i, e in UNFORMATTABLE])
def test_raises_where_unleash_throws(event: Event) -> None:
    """Events that make Unleash's formatter throw (so it sends nothing) raise here."""
    with pytest.raises(UnformattableEventError):
        format_event_markdown(event, URL)


def test_absent_columns_read_as_null() -> None:
    """A column missing from the input counts as the null the database would hold."""
    full = api_event("feature-created", featureName="f", project=None)
    sparse = {"type": "feature-created", "createdBy": "alice@example.com", "featureName": "f"}
    assert format_event_markdown(sparse, URL) == format_event_markdown(full, URL)
    assert f"({URL}/projects/null/features/f)" in format_event_markdown(sparse, URL)


# --- differential test against Unleash's own formatter in Node.js -------------------------

NODE_RUNNER = """\
import { readFileSync } from 'node:fs';

const [formatterUrl, eventMapUrl] = process.argv.slice(2);
const { FeatureEventFormatterMd } = await import(formatterUrl);
const { EVENT_MAP } = await import(eventMapUrl);
const { unleashUrl, events } = JSON.parse(readFileSync(0, 'utf8'));
const formatter = new FeatureEventFormatterMd({ unleashUrl });

// What Unleash's event store hands its integrations (rowToEvent), rebuilt from the API form.
const held = (e) => ({
    id: e.id, type: e.type, createdBy: e.createdBy, createdAt: new Date(e.createdAt),
    createdByUserId: e.createdByUserId, data: e.data, preData: e.preData,
    tags: e.tags || [], featureName: e.featureName, project: e.project,
    environment: e.environment, groupType: e.groupType || undefined,
    groupId: e.groupId || undefined,
});
const results = events.map((e) => {
    try {
        return { text: formatter.format(held(e)).text };
    } catch (error) {
        return { error: String(error) };
    }
});
process.stdout.write(JSON.stringify({ eventMapTypes: Object.keys(EVENT_MAP), results }));
"""

NASTY = [
    "q\" <t> & /s =e `'",
    "naïve café — 日本語",
    "🚀 👩‍💻",
    "back\\slash\nnew line\ttab",
    "{{b}}{{user}}",
    "",
    "0",
    " ",
    "lone \ud800 surrogate",
    "<script>alert('x')</script>",
]
UNKNOWN_TYPES = [
    "",
    "some-future-event",
    "FEATURE-CREATED",
    "feature-created ",
    "null",
    "undefined",
    "{{b}}",
    "{{#event}}{{project}}{{/event}}",
    "{{event.createdAt}}",
    "{{",
    "{{=<% %>=}}",
    "constructor",
    "__proto__",
    "toString",
    "valueOf",
    "hasOwnProperty",
    "🚀",
]
FALLBACK_USERS = [
    "{{event.project}}",
    "{{#event}}{{project}}{{/event}}",
    "{{event.data}}",
    "{{event.tags}}",
    "{{{event.preData.name}}}",
    "{{& feature}}",
    "{{^event.data}}none{{/event.data}}",
    "{{event.groupType}}",
    "{{! comment }}x",
    "{{unclosed",
    "{{/event}}",
    None,
    "",
]
SCALARS: list[object] = [
    None,
    True,
    False,
    0,
    1,
    67,
    -0.0,
    1.5,
    1e21,
    2**60,
    "",
    "0",
    "32",
    "default",
    *NASTY,
]
COMPOUNDS: list[object] = [[], ["x", "y"], [1, None, ["a", [2]]], {}, {"name": "n"}, {"length": 0}]
RICH = {
    "name": "my-name",
    "title": "My title",
    "provider": "webhook",
    "username": "ci-token",
    "message": "Maintenance tonight",
    "email": "bob@example.com",
    "ownerId": 42,
    "type": "simple",
    "value": "tag-value",
    "oldProject": "old-project",
    "scheduledDate": "2026-12-01T10:00:00.000Z",
    "reason": "Its author was deleted.",
    "milestoneName": "Canary",
    "changeRequestId": 7,
}


def logged_event_types() -> list[str]:
    """Every event type constant Unleash 8.2.0 declares."""
    source = EVENT_TYPES_JS.read_text(encoding="utf-8")
    types = re.findall(r"^export const [A-Z_]+ = '([^']+)';$", source, re.MULTILINE)
    assert len(types) > 150, "Unleash's event type list has changed shape"
    return types


def nastied(value: object, nasty: Iterator[str]) -> object:
    """`value` with every string replaced by the next nasty one."""
    if isinstance(value, dict):
        return {key: nastied(item, nasty) for key, item in value.items()}
    return next(nasty) if isinstance(value, str) else value


def shapes_for(event_type: str) -> Iterator[Event]:
    """The same event type in realistic, empty, nasty and odd shapes."""
    nasty = iter(NASTY * 10)
    yield api_event(event_type, data=RICH, preData=RICH, **IN_FLAG)
    yield api_event(event_type, createdBy=None)
    yield api_event(event_type, data={}, preData={}, project="p")
    yield api_event(event_type, preData={"changeRequestId": 3}, project="p", environment="e")
    yield api_event(
        event_type,
        data=nastied(RICH, nasty),
        preData=nastied(RICH, nasty),
        createdBy=next(nasty),
        featureName=next(nasty),
        project=next(nasty),
        environment=next(nasty),
    )
    for odd in ["text", 42, [1, 2], True, 0, ""]:
        yield api_event(event_type, data=odd, preData=odd, **IN_FLAG)
    for request_id in [0, "0", "12", 1.5, 2**60, NASTY[0], [], {}, True]:
        yield api_event(event_type, data={"changeRequestId": request_id}, project="p")
    yield api_event(event_type, featureName="f", project=None, groupType="cr", groupId="9")


def fallback_events() -> Iterator[Event]:
    for user in FALLBACK_USERS:
        yield api_event("some-future-event", createdBy=user, data=RICH, **IN_FLAG)


def strategy_events(rng: random.Random, count: int) -> Iterator[Event]:
    for index in range(count):
        event_type = (
            "feature-strategy-update"
            if index % 5
            else rng.choice(["feature-strategy-add", "feature-strategy-remove"])
        )
        before = random_strategy(rng)
        after = mutated(rng, before) if rng.random() < 0.6 else random_strategy(rng)
        if rng.random() < 0.1:
            before = None
        yield api_event(
            event_type,
            data=after,
            preData=before,
            featureName=rng.choice(["f", None, NASTY[1]]),
            project=rng.choice(["p", None, NASTY[0]]),
            environment=rng.choice(["production", None, ""]),
        )


STRATEGY_NAMES = [
    "flexibleRollout",
    "default",
    "remoteAddress",
    "applicationHostname",
    "userWithId",
    NASTY[2],
]
PARAMETER_POOLS: dict[str, list[object]] = {
    "rollout": ["0", "32", "67", "100", 0, 32, 32.0, 67.5, None, "", True],
    "stickiness": ["default", "random", "userId", "", None, 0],
    "groupId": ["new-feature", "other", "", None, NASTY[0]],
    "IPs": [
        "",
        "127.0.0.1",
        "10.0.0.1,10.0.0.2",
        [],
        ["a", "b"],
        None,
        0,
        5,
        {"length": 0},
        {},
        NASTY[2],
    ],
    "hostNames": ["", "unleash.com", [], ["a", None], None, {"length": 1}],
}


def random_strategy(rng: random.Random) -> object:
    if rng.random() < 0.05:
        return rng.choice(["flexibleRollout", 0, [], True, ""])
    strategy: dict[str, object] = {}
    if rng.random() < 0.9:
        strategy["name"] = rng.choice(STRATEGY_NAMES)
    if rng.random() < 0.3:
        strategy["title"] = rng.choice(SCALARS)
    if rng.random() < 0.85:
        strategy["parameters"] = random_parameters(rng)
    if rng.random() < 0.8:
        strategy["constraints"] = random_constraints(rng)
    if rng.random() < 0.6:
        strategy["segments"] = rng.choice(
            [[], [1, 2], [3], None, "1,2", [None, [1, 2]], {"length": 0}, 5]
        )
    return strategy


def random_parameters(rng: random.Random) -> object:
    if rng.random() < 0.08:
        return rng.choice([None, "s", [], 0, {}])
    return {name: rng.choice(pool) for name, pool in PARAMETER_POOLS.items() if rng.random() < 0.8}


OPERATORS = [
    "IN",
    "NOT_IN",
    "STR_CONTAINS",
    "STR_STARTS_WITH",
    "STR_ENDS_WITH",
    "NUM_EQ",
    "NUM_GT",
    "NUM_GTE",
    "NUM_LT",
    "NUM_LTE",
    "DATE_BEFORE",
    "DATE_AFTER",
    "SEMVER_EQ",
    "SEMVER_GT",
    "SEMVER_LT",
    "SEMVER_GTE",
    "SEMVER_LTE",
    "REGEX",
    "UNKNOWN_OP",
    None,
    ["IN"],
    "constructor",
    "toString",
    7,
]


def random_constraints(rng: random.Random) -> object:
    if rng.random() < 0.2:
        return rng.choice([[], None, "", "abc", {"length": 0}, 3])
    return [random_constraint(rng) for _ in range(rng.randint(1, 3))]


def random_constraint(rng: random.Random) -> object:
    if rng.random() < 0.08:
        return rng.choice([None, "str", [], 4, {"hasOwnProperty": 1, "value": "v"}])
    constraint: dict[str, object] = {}
    if rng.random() < 0.9:
        constraint["contextName"] = rng.choice(["appName", "userId", None, *NASTY[:3]])
    if rng.random() < 0.95:
        constraint["operator"] = rng.choice(OPERATORS)
    if rng.random() < 0.5:
        constraint["value"] = rng.choice([*SCALARS, *COMPOUNDS])
    if rng.random() < 0.6:
        constraint["values"] = rng.choice(
            [["x", "y"], [], ["4"], [None, ["a", "b"], 1.5], None, "x", {"a": 1}, 5]
        )
    if rng.random() < 0.7:
        constraint["inverted"] = rng.choice([True, False, 1, 0, "", None])
    if rng.random() < 0.5:
        constraint["caseInsensitive"] = rng.choice([True, False])
    return constraint


def mutated(rng: random.Random, strategy: object) -> object:
    """A copy of `strategy` with one part changed, so unchanged parts compare equal."""
    changed = copy.deepcopy(strategy)
    if not isinstance(changed, dict):
        return changed
    part = rng.choice(["parameters", "constraints", "segments", "title", "same"])
    parameters = changed.get("parameters")
    if part == "parameters" and isinstance(parameters, dict):
        name = rng.choice(list(PARAMETER_POOLS))
        parameters[name] = rng.choice(PARAMETER_POOLS[name])
    elif part == "constraints":
        changed["constraints"] = random_constraints(rng)
    elif part == "segments":
        changed["segments"] = rng.choice([[], [1], [1, 2], None])
    elif part == "title":
        changed["title"] = rng.choice(SCALARS)
    return changed


def generated_events() -> list[Event]:
    """Every event type Unleash declares, unknown types, fallback templates, strategy fuzz."""
    types = sorted(FORMATTED_EVENT_TYPES | set(logged_event_types()) | set(UNKNOWN_TYPES))
    events = [event for event_type in types for event in shapes_for(event_type)]
    events += fallback_events()
    events += strategy_events(random.Random(8_2_0), 3000)
    # The hand-written cases too, so their expectations are Unleash's and not only ours.
    events += [event for _, event, _ in TABLE] + [event for _, event in UNFORMATTABLE]
    return events


@dataclass(frozen=True)
class UnleashRun:
    """What Unleash's formatter made of the generated events."""

    event_map_types: list[str]
    events: list[Event]
    outcomes: list[Outcome]


@pytest.fixture(scope="module")
def unleash_formatted(tmp_path_factory: pytest.TempPathFactory) -> UnleashRun:
    """Unleash's own formatter run once over all generated events."""
    node = require_node(FORMATTER_JS)
    runner = tmp_path_factory.mktemp("markdown") / "format-events.mjs"
    runner.write_text(NODE_RUNNER, encoding="utf-8")
    events = generated_events()
    output = run_json(
        node,
        [str(runner), FORMATTER_JS.as_uri(), EVENT_MAP_JS.as_uri()],
        {"unleashUrl": URL, "events": events},
    )
    assert isinstance(output, dict)
    return UnleashRun(output["eventMapTypes"], events, output["results"])


def our_outcome(event: Event) -> Outcome:
    try:
        return {"text": format_event_markdown(event, URL)}
    except UnformattableEventError as error:
        return {"error": str(error)}


def test_knows_exactly_unleash_event_map(unleash_formatted: UnleashRun) -> None:
    """The event types with a dedicated sentence are exactly those in Unleash's EVENT_MAP."""
    assert set(unleash_formatted.event_map_types) == FORMATTED_EVENT_TYPES


def test_identical_to_unleash_formatter(unleash_formatted: UnleashRun) -> None:
    """Every generated event gets Unleash's text byte for byte, or fails where Unleash throws."""
    events = unleash_formatted.events
    mismatches = []
    for event, expected in zip(events, unleash_formatted.outcomes, strict=True):
        ours = our_outcome(event)
        if ours.get("text") != expected.get("text") or ("error" in ours) != ("error" in expected):
            mismatches.append({"event": event, "unleash": expected, "ours": ours})
    assert not mismatches, f"{len(mismatches)} of {len(events)} differ; first ones:\n" + "\n".join(
        json.dumps(m, ensure_ascii=False) for m in mismatches[:5]
    )
