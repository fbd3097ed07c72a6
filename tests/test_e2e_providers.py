"""Differential end to end: the poller's providers against Unleash's own integrations.

Unleash's Teams Workflow, Datadog and New Relic integrations are created through its admin
API, its legacy Slack and Teams ones as rows in its `addons` table (8.2.0 refuses to create
them; existing rows still post). Each posts to one receiver path; the poller's providers of
the same names post to another. A real event mix (several `slack` tags, nasty strings) is
driven through the admin API; then every request the poller sent is looked for among those
Unleash sent, body and headers. The Slack App cannot be pointed at a receiver: its own
`slack-app.js` is run offline under Node with a fake client on the same events.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from poller.config import parse_config
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.unleash import AdminClient, UnleashServer, unleash_package_dir
from tests.test_e2e_dropin import (
    NASTY_DESCRIPTION,
    drive_event_mix,
    insert_crafted_events,
    unique,
)

pytestmark = pytest.mark.e2e

PollerConfigFactory = Any
PollerCli = Any

# Transport headers each HTTP client sets its own way; everything else is compared.
NOT_COMPARED = frozenset(
    {"host", "content-length", "connection", "user-agent", "accept", "accept-encoding",
     "transfer-encoding"}
)  # fmt: skip
SLACK_CHANNELS = ("alpha", "beta-<&>", "gamma")


@dataclass(frozen=True)
class Integration:
    """One provider configured on both sides: Unleash's parameters and the poller's keys."""

    provider: str
    unleash_parameters: Mapping[str, str]
    poller_keys: Mapping[str, object]
    through_sql: bool = False  # deprecated in 8.2.0: a row in `addons`, not an API call


def integrations(url_of: Any) -> list[Integration]:
    headers = {"X-Trace": 't "1" <&>', "X-Team": "platform"}
    return [
        Integration(
            "slack",
            {
                "url": url_of("unleash", "slack"),
                "defaultChannel": "fallback",
                "username": 'Bot "q" <&>',
                "emojiIcon": ":rocket:",
                "customHeaders": json.dumps(headers),
            },
            {
                "url": url_of("poller", "slack"),
                "default_channel": "fallback",
                "username": 'Bot "q" <&>',
                "emoji_icon": ":rocket:",
                "headers": headers,
            },
            through_sql=True,
        ),
        Integration(
            "teams",
            {"url": url_of("unleash", "teams"), "customHeaders": json.dumps(headers)},
            {"url": url_of("poller", "teams"), "headers": headers},
            through_sql=True,
        ),
        Integration(
            "teamsworkflow",
            {"url": url_of("unleash", "teamsworkflow")},
            {"url": url_of("poller", "teamsworkflow")},
        ),
        Integration(
            "datadog",
            {
                "url": url_of("unleash", "datadog"),
                "apiKey": "dd-key-123",
                "sourceTypeName": "unleash-src",
                "customHeaders": json.dumps(headers),
            },
            {
                "url": url_of("poller", "datadog"),
                "api_key": "dd-key-123",
                "source_type_name": "unleash-src",
                "headers": headers,
            },
        ),
        Integration(
            "datadog-template",
            {
                "url": url_of("unleash", "datadog-template"),
                "apiKey": "dd-key-456",
                "bodyTemplate": "{{event.type}} {{event.featureName}} {{event.data.description}}"
                " by {{event.createdBy}} {{event.data.name}}",
            },
            {
                "url": url_of("poller", "datadog-template"),
                "api_key": "dd-key-456",
                "body_template": "{{event.type}} {{event.featureName}} {{event.data.description}}"
                " by {{event.createdBy}} {{event.data.name}}",
            },
        ),
        Integration(
            "new-relic",
            {
                "url": url_of("unleash", "new-relic"),
                "licenseKey": "nr-license-789",
                "customHeaders": json.dumps(headers),
            },
            {
                "url": url_of("poller", "new-relic"),
                "license_key": "nr-license-789",
                "headers": headers,
            },
        ),
    ]


def provider_name(integration: Integration) -> str:
    return integration.provider.removesuffix("-template")


def provider_definitions(admin: AdminClient) -> dict[str, list[str]]:
    """Each provider Unleash offers → the event types its definition lists."""
    providers = admin.request("GET", "/api/admin/addons")["providers"]
    return {p["name"]: list(p["events"]) for p in providers}


def create_integration(
    unleash: UnleashServer, admin: AdminClient, integration: Integration, events: Sequence[str]
) -> None:
    if integration.through_sql:
        unleash.db.psql(
            "INSERT INTO addons (provider, description, enabled, parameters, events, projects,"
            " environments) VALUES (:'provider', 'differential', true, :'parameters'::json,"
            " :'events'::json, '[]'::jsonb, '[]'::jsonb)",
            provider=provider_name(integration),
            parameters=json.dumps(integration.unleash_parameters),
            events=json.dumps(list(events)),
        )
        return
    admin.request(
        "POST",
        "/api/admin/addons",
        {
            "provider": provider_name(integration),
            "description": "differential",
            "enabled": True,
            "parameters": dict(integration.unleash_parameters),
            "events": list(events),
            "projects": ["*"],
            "environments": ["*"],
        },
    )


def disable_all(unleash: UnleashServer) -> None:
    # Disabled, not deleted: 8.2.0 crashes when an integration goes while it delivers.
    unleash.db.psql("UPDATE addons SET enabled = false WHERE description = 'differential'")


def body_of(request: RecordedRequest) -> bytes:
    """The body as sent: the receiver (aiohttp) may or may not have inflated a gzip one."""
    body = request.body
    if body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    return body


def compared_headers(request: RecordedRequest) -> list[tuple[str, str]]:
    headers = [(k.lower(), v) for k, v in request.headers if k.lower() not in NOT_COMPARED]
    return sorted(headers)


@dataclass
class Tally:
    compared: int = 0
    identical: int = 0
    problems: list[str] = field(default_factory=list)


def compare(theirs: list[RecordedRequest], ours: list[RecordedRequest]) -> Tally:
    """Each of our requests must have an identical one (body, headers) among Unleash's,
    and each distinct request Unleash sent must be one of ours (Unleash may send one twice;
    events share no id field, so requests are matched by content)."""
    tally = Tally()
    their_keys = {(body_of(r), tuple(compared_headers(r))) for r in theirs}
    our_keys = {(body_of(r), tuple(compared_headers(r))) for r in ours}
    their_bodies = {body_of(r): r for r in theirs}
    for request in ours:
        tally.compared += 1
        key = (body_of(request), tuple(compared_headers(request)))
        if key in their_keys:
            tally.identical += 1
            continue
        twin = their_bodies.get(key[0])
        if twin is not None:
            tally.problems.append(
                f"headers differ: unleash {compared_headers(twin)} poller {list(key[1])}"
            )
        else:
            tally.problems.append(f"no Unleash request with this body: {key[0][:400]!r}")
    for body, _ in their_keys - our_keys:
        if body not in {k[0] for k in our_keys}:
            tally.problems.append(f"Unleash sent a request the poller did not: {body[:400]!r}")
    return tally


def drive_slack_mix(admin: AdminClient) -> str:
    """A flag with several `slack` tags, changed so its events carry them."""
    admin.ensure_tag_type("slack")
    flag = unique("slacked")
    admin.create_feature(flag, description=NASTY_DESCRIPTION)
    for channel in SLACK_CHANNELS:
        admin.tag_feature(flag, channel, tag_type="slack")
    admin.update_feature(flag, description='tagged "now" <b>&</b> 🚀')
    admin.set_environment_enabled(flag, "development", True)
    admin.set_stale(flag, True)
    admin.archive_feature(flag)
    return flag


def insert_provider_events(unleash: UnleashServer, flag: str) -> None:
    """Rows no open-source admin call makes but Unleash's store holds: change requests
    (their links), a text past Slack's 3,000-character cut with an emoji astride it,
    repeated and odd `slack` tags, and tags a Datadog body lists."""
    db = unleash.db
    for kind in ("change-request-created", "change-request-applied", "change-added"):
        db.insert_events(
            1,
            type=kind,
            environment="production",
            feature_name=flag,
            data={"changeRequestId": 42, "state": "Draft"},
        )
    # The text before the reason is ~150 characters: the cut at 3,000 lands in the emoji.
    reason = "".join(f"{i % 10}" for i in range(3000 - 220)) + "🚀" * 100 + " end"
    db.insert_events(
        1,
        type="change-request-schedule-suspended",
        environment="production",
        feature_name=flag,
        data={"changeRequestId": 43, "reason": reason},
        tags=[{"type": "slack", "value": "alpha"}, {"type": "slack", "value": "general"}],
    )
    db.insert_events(
        1,
        type="feature-updated",
        feature_name=flag,
        data={"description": 'n "q" <&>', "eventType": "spoofed", "0": "zero"},
        tags=[
            {"type": "slack", "value": "alpha"},
            {"type": "slack", "value": "alpha"},
            {"type": "simple", "value": "s<&>"},
            {"type": "slack", "value": "🚀 ünï"},
        ],
    )


@dataclass
class Run:
    unleash: UnleashServer
    events: list[dict[str, Any]]
    theirs: dict[str, list[RecordedRequest]]
    ours: dict[str, list[RecordedRequest]]
    compared: list[Integration]
    config_path: Path


@pytest.fixture
def differential(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> Run:
    """Both sides configured, the event mix driven, the poller run once."""
    if int(unleash.version.split(".", 1)[0]) < 7:
        # The matrix; the event mix also uses admin APIs 5.x does not have.
        pytest.skip(
            f"the provider differential runs on Unleash 7.6.5 and 8.2.0, not {unleash.version}"
        )
    base = "/" + unique("providers")

    def url_of(side: str, name: str) -> str:
        return receiver.url(f"{base}/{side}/{name}")

    offered = provider_definitions(admin)
    setups = [i for i in integrations(url_of) if provider_name(i) in offered]
    try:
        for integration in setups:
            create_integration(unleash, admin, integration, offered[provider_name(integration)])
        # Unleash caches its integrations for 60 s: probe until every one has posted.
        deadline = time.monotonic() + 150
        while True:
            admin.create_feature(unique("probe"))
            try:
                for integration in setups:
                    receiver.wait_for(1, f"{base}/unleash/{integration.provider}", timeout_s=5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(2)  # late deliveries of the probes
        for integration in setups:
            receiver.reset(f"{base}/unleash/{integration.provider}")
        start = admin.latest_event_id()
        flags = drive_event_mix(admin)
        slacked = drive_slack_mix(admin)
        insert_crafted_events(unleash, flags["nasty"])
        insert_provider_events(unleash, slacked)
        config = poller_config(
            webhooks=[
                {"name": i.provider, "provider": provider_name(i), **i.poller_keys} for i in setups
            ],
            start_from=start,
        )
        poller_cli("run", "-c", config, "--once")
        events = admin.all_events(after_id=start)
        # Unleash delivers asynchronously: wait until its side has gone quiet.
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 6:
            count = len(receiver.requests())
            if count != last:
                last, quiet_since = count, time.monotonic()
            time.sleep(0.3)
        assert flags
    finally:
        disable_all(unleash)
    return Run(
        unleash,
        events,
        {i.provider: receiver.requests(f"{base}/unleash/{i.provider}") for i in setups},
        {i.provider: receiver.requests(f"{base}/poller/{i.provider}") for i in setups},
        setups,
        config,
    )


def test_every_provider_sends_what_unleash_own_integration_sends(differential: Run) -> None:
    """For each provider, every request the poller sent equals one Unleash's own integration
    sent for the same event mix (body and headers), and none of Unleash's is missing, on
    every version: a Datadog body_template escapes as that server's version does."""
    run = differential
    failures = []
    for integration in run.compared:
        ours = run.ours[integration.provider]
        theirs = run.theirs[integration.provider]
        tally = compare(theirs, ours)
        print(
            f"\nFIGURES: unleash {run.unleash.version} provider {integration.provider}:"
            f" compared {tally.compared}, identical {tally.identical}"
            f" (unleash sent {len(theirs)})"
        )
        for problem in tally.problems[:5]:
            print(f"MISMATCH [{integration.provider}] {problem}")
        assert tally.compared >= 10, integration.provider
        if tally.problems:
            failures.append(f"{integration.provider}: {len(tally.problems)} problems")
    slack = run.ours.get("slack", [])
    channels = {json.loads(r.body)["channel"] for r in slack}
    assert {f"#{c}" for c in SLACK_CHANNELS} <= channels, channels  # one POST per tag
    assert not failures, failures


NODE_SLACK_APP = r"""
import { readFileSync } from 'node:fs';
const { default: SlackAppAddon } = await import(
    './node_modules/unleash-server/dist/lib/addons/slack-app.js');
const input = JSON.parse(readFileSync(0, 'utf8'));
const calls = [];
const client = { on() {}, chat: { postMessage: async (args) => {
    calls.push(JSON.stringify(args)); return { ok: true }; } } };
const logger = { debug() {}, info() {}, warn() {}, error() {} };
const addon = new SlackAppAddon({
    getLogger: () => logger, unleashUrl: input.unleashUrl,
    integrationEventsService: { registerEvent: async () => {} },
    eventBus: { emit() {} }, flagResolver: { isEnabled: () => false },
}, () => client);
const out = [];
for (const event of input.events) {
    calls.length = 0;
    await addon.handleEvent({ ...event, createdAt: new Date(event.createdAt) },
        input.parameters, 1);
    out.push([...calls]);
}
console.log(JSON.stringify(out));
"""

STORE_COLUMNS = (
    "id", "type", "createdBy", "createdAt", "createdByUserId", "data", "preData", "tags",
    "featureName", "project", "environment",
)  # fmt: skip


def as_stored(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event as Unleash's store hands it to an integration."""
    stored = {name: event.get(name) for name in STORE_COLUMNS}
    stored["tags"] = stored["tags"] or []
    stored.update({k: event[k] for k in ("groupType", "groupId") if event.get(k)})
    return stored


def test_slack_app_sends_what_unleash_slack_app_passes_to_its_client(
    differential: Run, tmp_path: Path
) -> None:
    """Unleash's own slack-app.js, run under Node with a fake Slack client on the same
    events, passes exactly the arguments our slack-app provider sends as its JSON body,
    one call per channel in the same order."""
    run = differential
    default_channels = ["general", "alpha"]
    parameters = {"accessToken": "xoxb-test", "defaultChannels": " general , alpha"}
    completed = subprocess.run(
        ["node", "--input-type=module", "-e", NODE_SLACK_APP],
        cwd=unleash_package_dir(run.unleash.version),
        input=json.dumps(
            {
                "unleashUrl": run.unleash.url,
                "parameters": parameters,
                "events": [as_stored(e) for e in run.events],
            }
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    theirs: list[list[str]] = json.loads(completed.stdout)
    config = parse_config(
        {
            "unleash": {"url": run.unleash.url, "token": "t"},
            "webhooks": [
                {
                    "name": "app",
                    "provider": "slack-app",
                    "access_token": "xoxb-test",
                    "default_channels": default_channels,
                }
            ],
        },
        tmp_path,
    )
    [hook] = config.webhooks
    assert hook.provider is not None
    compared = identical = 0
    problems = []
    for event, calls in zip(run.events, theirs, strict=True):
        ours = [r.body.decode() for r in hook.provider.requests(event)]
        for index in range(max(len(calls), len(ours))):
            compared += 1
            mine = ours[index] if index < len(ours) else None
            their = calls[index] if index < len(calls) else None
            if mine == their:
                identical += 1
            else:
                problems.append(f"event {event['id']} {event['type']}: {their!r} / {mine!r}")
        for request in hook.provider.requests(event):
            assert dict(request.headers)["Authorization"] == "Bearer xoxb-test"
    print(
        f"\nFIGURES: unleash {run.unleash.version} provider slack-app (offline):"
        f" compared {compared}, identical {identical}"
    )
    for problem in problems[:5]:
        print(f"MISMATCH [slack-app] {problem}")
    # Every event goes to the two default channels at least (unless Unleash's formatter
    # throws on it, then neither side sends anything).
    assert compared >= 2 * len(run.events) - 4
    assert not problems, problems[0]
