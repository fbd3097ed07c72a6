"""End to end: the real CLI (`python -m poller run --once`) against a real Unleash and a real
HTTP receiver. Flags are changed through Unleash's admin API; what the receiver got is
compared with Unleash's own event log.
"""

from __future__ import annotations

import functools
import http.cookiejar
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import render_poller_config
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.unleash import AdminClient, UnleashServer

pytestmark = pytest.mark.e2e

# The order in which Unleash serialises an event (groupType/groupId follow when set).
UNLEASH_FIELD_ORDER = (
    "id", "type", "createdBy", "createdAt", "createdByUserId", "data", "preData", "tags",
    "featureName", "project", "environment",
)  # fmt: skip
UNLEASH_OPTIONAL_FIELDS = ("groupType", "groupId")

PollerConfigFactory = Callable[..., Path]  # the `poller_config` fixture
PollerCli = Callable[..., "subprocess.CompletedProcess[str]"]  # the `poller_cli` fixture

TEMPLATE = '{"event": "{{event.type}}", "flag": "{{event.featureName}}"}'


def unique(prefix: str) -> str:
    """A flag name / receiver path component no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def default_body(event: Mapping[str, Any]) -> bytes:
    """Unleash's webhook body without a template: the event as compact JSON, its field
    order, no `label`/`summary` (which only the search endpoint adds)."""
    fields = {key: value for key, value in event.items() if key not in ("label", "summary")}
    keys = list(fields)
    assert keys[: len(UNLEASH_FIELD_ORDER)] == list(UNLEASH_FIELD_ORDER), keys
    assert set(keys[len(UNLEASH_FIELD_ORDER) :]) <= set(UNLEASH_OPTIONAL_FIELDS), keys
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def passes(
    event: Mapping[str, Any],
    *,
    events: Sequence[str] | None = None,
    projects: Sequence[str] | None = None,
    environments: Sequence[str] | None = None,
) -> bool:
    """Unleash's own integration filter: type globs; `*` or a missing project/environment
    on the event lets it through."""
    if events is not None and not any(fnmatchcase(event["type"], glob) for glob in events):
        return False
    project, environment = event.get("project"), event.get("environment")
    if projects is not None and "*" not in projects and project and project not in projects:
        return False
    return not (
        environments is not None
        and "*" not in environments
        and environment
        and environment not in environments
    )


def delivered_ids(requests: Sequence[RecordedRequest]) -> list[int]:
    return [json.loads(r.body)["id"] for r in requests]


def wait_for_ids(
    receiver: Receiver, path: str, ids: Collection[int], *, timeout_s: float
) -> dict[int, RecordedRequest]:
    """Block until requests carrying every event id in `ids` reached `path`; by id."""
    deadline = time.monotonic() + timeout_s
    count = 1
    while True:
        got = receiver.wait_for(count, path, timeout_s=max(0.0, deadline - time.monotonic()))
        by_id = {json.loads(r.body)["id"]: r for r in got}
        if set(ids) <= set(by_id):
            return by_id
        count = len(got) + 1


def change_a_flag_in_every_way(admin: AdminClient, flag: str) -> None:
    """Create a flag and put it through the changes a team makes, one admin call each."""
    admin.create_feature(flag, description="Checkout v2 — café ✓")
    admin.update_feature(flag, description='new "checkout" <flow> & more')
    admin.set_environment_enabled(flag, "development", True)
    admin.set_environment_enabled(flag, "production", True)
    strategy = admin.add_flexible_rollout(flag, "production", rollout=25)
    admin.update_flexible_rollout(flag, "production", strategy, rollout=75)
    admin.delete_strategy(flag, "production", strategy)
    admin.set_environment_enabled(flag, "development", False)
    admin.ensure_tag_type("team")
    admin.tag_feature(flag, "platform", tag_type="team")
    admin.untag_feature(flag, "platform", tag_type="team")
    admin.set_stale(flag, True)
    admin.set_stale(flag, False)
    admin.archive_feature(flag)
    admin.revive_feature(flag)
    segment = admin.create_segment(unique("seg"), values=["a@example.com"])
    admin.update_segment(segment, f"seg-{segment}", values=["b@example.com"])
    admin.create_api_token(unique("token"))


def test_once_delivers_new_events_in_id_order_with_unleash_bodies_and_headers(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """--once sends each new event in id order with Unleash's body, template and headers."""
    base = "/" + unique("bodies")
    plain, templated = f"{base}/plain", f"{base}/templated"
    config = poller_config(
        webhooks=[
            {"name": "plain", "url": receiver.url(plain)},
            {
                "name": "templated",
                "url": receiver.url(templated),
                "events": ["feature-*"],
                "projects": ["*"],
                "content_type": "application/vnd.test+json",
                "authorization": "Bearer abc",
                "headers": {"X-Team": "platform", "X-Trace": "e2e"},
                "body_template": TEMPLATE,
                "template_engine": "mustache",
                "retries": 1,
                "timeout_s": 10,
            },
        ],
        start_from="latest",
    )
    admin.create_feature(unique("before-first-run"))
    start = admin.latest_event_id()

    poller_cli("run", "-c", config, "--once")
    assert receiver.requests(plain) == []
    assert receiver.requests(templated) == []

    change_a_flag_in_every_way(admin, unique("every-way"))
    events = admin.all_events(after_id=start)
    assert len(events) >= 20
    poller_cli("run", "-c", config, "--once")

    got = receiver.wait_for(len(events), plain, timeout_s=10)
    assert delivered_ids(got) == [e["id"] for e in events]
    assert [r.body for r in got] == [default_body(e) for e in events]
    for request in got:
        assert request.method == "POST"
        assert request.header("Content-Type") == "application/json"
        assert request.header("Authorization") is None
        assert request.header("X-Team") is None

    feature_events = [e for e in events if passes(e, events=["feature-*"])]
    got_templated = receiver.wait_for(len(feature_events), templated, timeout_s=10)
    assert [r.body for r in got_templated] == [
        json.dumps({"event": e["type"], "flag": e["featureName"]}).encode() for e in feature_events
    ]
    for request in got_templated:
        assert request.header("Content-Type") == "application/vnd.test+json"
        assert request.header("Authorization") == "Bearer abc"
        assert request.header("X-Team") == "platform"
        assert request.header("X-Trace") == "e2e"

    poller_cli("run", "-c", config, "--once")
    assert len(receiver.requests(plain)) == len(events)
    assert len(receiver.requests(templated)) == len(feature_events)


def test_once_applies_event_project_and_environment_filters_like_unleash(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """Each webhook gets exactly what its event globs, projects and environments select."""
    base = "/" + unique("filters")
    filters: dict[str, dict[str, list[str]]] = {
        "audit": {"events": ["feature-created", "feature-environment-*"]},
        "production": {"environments": ["production"]},
        "default-project": {"projects": ["default"], "events": ["feature-*", "segment-*"]},
        "other-project": {"projects": ["payments"]},
        "development-strategies": {
            "events": ["feature-strategy-*"],
            "projects": ["*"],
            "environments": ["development"],
        },
    }
    config = poller_config(
        webhooks=[
            {"name": name, "url": receiver.url(f"{base}/{name}"), **selection}
            for name, selection in filters.items()
        ]
    )
    poller_cli("run", "-c", config, "--once")
    start = admin.latest_event_id()

    change_a_flag_in_every_way(admin, unique("filtered"))
    second = unique("filtered-dev")
    admin.create_feature(second)
    strategy = admin.add_flexible_rollout(second, "development", rollout=10)
    admin.update_flexible_rollout(second, "development", strategy, rollout=20)
    poller_cli("run", "-c", config, "--once")

    events = admin.all_events(after_id=start)
    for name, selection in filters.items():
        expected = [e for e in events if passes(e, **selection)]
        assert expected, f"scenario produced no event for {name}"
        got = receiver.wait_for(len(expected), f"{base}/{name}", timeout_s=10)
        assert delivered_ids(got) == [e["id"] for e in expected], name
        assert [r.body for r in got] == [default_body(e) for e in expected], name


def test_start_from_latest_skips_history_and_a_second_once_sends_nothing(
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """start_from = "latest" skips older events; with no new events a rerun sends nothing."""
    path = "/" + unique("latest")
    for _ in range(3):
        admin.create_feature(unique("history"))
    config = poller_config(webhooks=[{"name": "all", "url": receiver.url(path)}])

    poller_cli("run", "-c", config, "--once")
    poller_cli("run", "-c", config, "--once")
    assert receiver.requests(path) == []

    start = admin.latest_event_id()
    flag = unique("after-start")
    admin.create_feature(flag)
    poller_cli("run", "-c", config, "--once")
    got = receiver.wait_for(1, path, timeout_s=10)
    assert [json.loads(r.body)["featureName"] for r in got] == [flag]
    assert delivered_ids(got) == [e["id"] for e in admin.all_events(after_id=start)]

    poller_cli("run", "-c", config, "--once")
    assert len(receiver.requests(path)) == 1


def test_start_from_an_event_id_delivers_from_the_event_after_it(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """start_from = N delivers N+1 onwards, including a 99-event burst from one INSERT."""
    path = "/" + unique("from-id")
    start = admin.latest_event_id()
    admin.create_feature(unique("from-id"))
    # 99: more than the poller's first page; fewer than one page of the 5.x search, whose
    # offset paging cannot be trusted through a batch sharing one created_at.
    unleash.db.insert_events(99, type="feature-updated", feature_name="burst")
    events = admin.all_events(after_id=start)
    assert len(events) == 100
    config = poller_config(webhooks=[{"name": "all", "url": receiver.url(path)}], start_from=start)

    poller_cli("run", "-c", config, "--once")

    got = receiver.wait_for(len(events), path, timeout_s=10)
    assert delivered_ids(got) == [e["id"] for e in events]
    assert [r.body for r in got] == [default_body(e) for e in events]


def test_an_event_that_commits_after_a_later_one_is_still_delivered(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """An event committed after a higher id was sent still arrives; a rollback blocks nothing."""
    path = "/" + unique("late-commit")
    config = poller_config(
        webhooks=[{"name": "all", "url": receiver.url(path)}],
        extra_unleash={"gap_grace_s": 60},
    )
    poller_cli("run", "-c", config, "--once")

    db = unleash.db
    with (
        db.open_transaction_inserting_event(feature_name=unique("late")) as late,
        db.open_transaction_inserting_event(feature_name=unique("rollback")) as rolled_back,
    ):
        [early] = db.insert_events(1, feature_name=unique("early"))
        assert late.id < rolled_back.id < early
        rolled_back.rollback()
        poller_cli("run", "-c", config, "--once")
        assert receiver.wait_for(1, path, timeout_s=10)
        assert delivered_ids(receiver.requests(path)) == [early]

        late.commit()
    poller_cli("run", "-c", config, "--once")
    got = receiver.wait_for(2, path, timeout_s=10)
    assert delivered_ids(got) == [early, late.id]
    [late_event] = [e for e in admin.all_events(after_id=late.id - 1) if e["id"] == late.id]
    assert got[1].body == default_body(late_event)


def test_bodies_and_headers_match_unleash_own_webhook_integration(
    request: pytest.FixtureRequest,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """Bodies and headers are byte-identical to Unleash's own webhook integration's."""
    base = "/" + unique("native")
    headers = {"X-Team": "platform"}
    types = admin.webhook_event_types()
    plain = admin.create_webhook(receiver.url(f"{base}/unleash-plain"), events=types)
    templated = admin.create_webhook(
        receiver.url(f"{base}/unleash-templated"),
        events=types,
        body_template=TEMPLATE,
        authorization="Bearer abc",
        custom_headers=headers,
    )
    # Left enabled, Unleash would post every later test's events too (bulk inserts
    # included); disabled, not deleted: deleting one mid-delivery crashes Unleash 8.2.0.
    for addon_id, suffix in ((plain, "unleash-plain"), (templated, "unleash-templated")):
        request.addfinalizer(
            functools.partial(
                admin.update_webhook,
                addon_id,
                receiver.url(f"{base}/{suffix}"),
                events=types,
                enabled=False,
            )
        )
    # Unleash caches its list of integrations for up to 60 s: probe until both are live.
    deadline = time.monotonic() + 90
    while not (
        receiver.requests(f"{base}/unleash-plain")
        and receiver.requests(f"{base}/unleash-templated")
    ):
        admin.create_feature(unique("probe"))
        try:
            receiver.wait_for(1, f"{base}/unleash-templated", timeout_s=5)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    config = poller_config(
        webhooks=[
            {"name": "plain", "url": receiver.url(f"{base}/poller-plain")},
            {
                "name": "templated",
                "url": receiver.url(f"{base}/poller-templated"),
                "events": types,
                "authorization": "Bearer abc",
                "headers": headers,
                "body_template": TEMPLATE,
            },
        ]
    )
    poller_cli("run", "-c", config, "--once")
    start = admin.latest_event_id()

    change_a_flag_in_every_way(admin, unique("native"))
    poller_cli("run", "-c", config, "--once")

    events = [e for e in admin.all_events(after_id=start) if e["type"] in types]
    ids = [e["id"] for e in events]
    assert len(ids) >= 15
    unleash_plain = wait_for_ids(receiver, f"{base}/unleash-plain", ids, timeout_s=30)
    poller_plain = wait_for_ids(receiver, f"{base}/poller-plain", ids, timeout_s=10)
    for event in events:
        assert poller_plain[event["id"]].body == unleash_plain[event["id"]].body
        assert poller_plain[event["id"]].body == default_body(event)

    # A templated body carries no id, and Unleash's own stream also holds the probes; both
    # of its integrations went live together, so they end up with as many requests.
    unleash_templated = receiver.wait_for(
        len(receiver.requests(f"{base}/unleash-plain")), f"{base}/unleash-templated", timeout_s=10
    )
    poller_templated = receiver.requests(f"{base}/poller-templated")
    expected_templated = {
        json.dumps({"event": e["type"], "flag": e["featureName"] or ""}).encode() for e in events
    }
    assert expected_templated <= {r.body for r in unleash_templated}
    assert [r.body for r in poller_templated] == [
        json.dumps({"event": e["type"], "flag": e["featureName"] or ""}).encode() for e in events
    ]
    theirs, ours = unleash_templated[-1], poller_templated[-1]
    for name in ("Content-Type", "Authorization", "X-Team"):
        assert ours.header(name) == theirs.header(name), name


def test_an_event_unleash_cannot_serve_does_not_stall_the_others(
    tmp_path: Path,
    unleash: UnleashServer,
    receiver: Receiver,
    poller_cli: PollerCli,
) -> None:
    """An event whose summary Unleash cannot build (a user name with Mustache tags) makes
    Unleash answer 500 for every page that holds it; the events around it still arrive."""
    if unleash.version != "8.2.0":
        pytest.skip("the failing summary is built by Unleash 8's event search")
    # Its own server: the bad event breaks every later search of the log that holds it.
    with UnleashServer(unleash.version, log_dir=tmp_path) as server:
        admin = server.admin()
        path = "/" + unique("poison")
        config = tmp_path / "poller.toml"
        config.touch(mode=0o600)
        config.write_text(
            render_poller_config(
                unleash_url=server.url,
                token=server.admin_token,
                state_path=tmp_path / "state.sqlite3",
                start_from=admin.latest_event_id(),
                webhooks=[{"name": "all", "url": receiver.url(path)}],
            )
        )
        before = unique("before")
        admin.create_feature(before)
        name, password = "eve{{#x}}", "Sup3r-Secret-pass!word"
        admin.request(
            "POST",
            "/api/admin/user-admin",
            {
                "username": name,
                "name": "Eve",
                "rootRole": 1,
                "password": password,
                "sendEmail": False,
            },
        )
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

        def as_eve(api_path: str, body: dict[str, object]) -> None:
            request = urllib.request.Request(  # noqa: S310 - loopback only
                server.url + api_path,
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            opener.open(request, timeout=10).close()

        # Unleash stores a new session asynchronously: the first call after logging in is
        # sometimes refused, so log in and try again a few times.
        for attempt in range(5):
            as_eve("/auth/simple/login", {"username": name, "password": password})
            try:
                as_eve("/api/admin/tag-types", {"name": unique("evetype"), "description": "d"})
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 401 or attempt == 4:
                    raise
                time.sleep(0.5)
        after = unique("after")
        admin.create_feature(after)
        result = poller_cli("run", "-c", config, "--once")
    assert "poll.unreadable_event" in result.stderr
    got = [json.loads(r.body) for r in receiver.requests(path)]
    names = [e.get("featureName") for e in got]
    assert before in names
    assert after in names
    assert [e["id"] for e in got] == sorted(e["id"] for e in got)
