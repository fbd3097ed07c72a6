"""`eventMarkdown`: Unleash 8.2.0's one-line description of an event, byte for byte.

A port of Unleash's `FeatureEventFormatterMd` as its integrations build it: Markdown
links (Slack's `<url|text>` for the Slack ones), single-asterisk bold, and the event's
"Open in Unleash" link. Unleash formats the event as its store holds it
in memory (absent columns are null, `createdAt` is a Date) and its formatter computes on
JavaScript values, so this module reproduces JavaScript's truthiness, strict equality,
property reads and string conversion wherever the text depends on them, and raises
`UnformattableEventError` wherever Unleash's formatter throws.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from poller import mustache
from poller.jsvalues import JSDate, to_js_string, utf16_length
from poller.render import EVENT_FIELDS, GROUP_FIELDS

if TYPE_CHECKING:
    from poller.render import Event  # render imports this module only when it is used

FEATURE_ARCHIVED: Final = "feature-archived"
FEATURE_STRATEGY_UPDATE: Final = "feature-strategy-update"
# The webhook integration keeps the formatter's default 'simple' style: single asterisks.
_BOLD: Final = "*"

# Unleash's EVENT_MAP actions, verbatim: they are Mustache templates, rendered with
# mustache.js semantics and no escaping, so they stay templates here too.
_ACTION_SOURCES: Final[Mapping[str, str]] = {
    "addon-config-created": (
        "{{b}}{{user}}{{b}} created a new {{b}}{{event.data.provider}}{{b}} integration "
        "configuration"
    ),
    "addon-config-deleted": (
        "{{b}}{{user}}{{b}} deleted a {{b}}{{event.preData.provider}}{{b}} integration "
        "configuration"
    ),
    "addon-config-updated": (
        "{{b}}{{user}}{{b}} updated a {{b}}{{event.preData.provider}}{{b}} integration "
        "configuration"
    ),
    "api-token-created": "{{b}}{{user}}{{b}} created API token {{b}}{{event.data.username}}{{b}}",
    "api-token-deleted": (
        "{{b}}{{user}}{{b}} deleted API token {{b}}{{event.preData.username}}{{b}}"
    ),
    "change-added": "{{b}}{{user}}{{b}} added a change to change request {{changeRequest}}",
    "change-discarded": "{{b}}{{user}}{{b}} discarded a change in change request {{changeRequest}}",
    "change-edited": "{{b}}{{user}}{{b}} edited a change in change request {{changeRequest}}",
    "change-request-applied": "{{b}}{{user}}{{b}} applied change request {{changeRequest}}",
    "change-request-approval-added": (
        "{{b}}{{user}}{{b}} added an approval to change request {{changeRequest}}"
    ),
    "change-request-approved": "{{b}}{{user}}{{b}} approved change request {{changeRequest}}",
    "change-request-cancelled": "{{b}}{{user}}{{b}} cancelled change request {{changeRequest}}",
    "change-request-created": "{{b}}{{user}}{{b}} created change request {{changeRequest}}",
    "change-request-discarded": "{{b}}{{user}}{{b}} discarded change request {{changeRequest}}",
    "change-request-rejected": "{{b}}{{user}}{{b}} rejected change request {{changeRequest}}",
    "change-request-sent-to-review": (
        "{{b}}{{user}}{{b}} sent to review change request {{changeRequest}}"
    ),
    "change-request-scheduled": (
        "{{b}}{{user}}{{b}} scheduled change request {{changeRequest}} to be applied at "
        "{{event.data.scheduledDate}}."
    ),
    "change-request-scheduled-application-success": (
        "{{b}}Successfully{{b}} applied the scheduled change request {{changeRequest}} by "
        "{{b}}{{user}}{{b}}."
    ),
    "change-request-scheduled-application-failure": (
        "{{b}}Failed{{b}} to apply the scheduled change request {{changeRequest}} by "
        "{{b}}{{user}}{{b}}."
    ),
    "change-request-schedule-suspended": (
        "Change request {{changeRequest}} was suspended for the following reason: "
        "{{event.data.reason}}"
    ),
    "context-field-created": (
        "{{b}}{{user}}{{b}} created context field {{b}}{{event.data.name}}{{b}}"
    ),
    "context-field-deleted": (
        "{{b}}{{user}}{{b}} deleted context field {{b}}{{event.preData.name}}{{b}}"
    ),
    "context-field-updated": (
        "{{b}}{{user}}{{b}} updated context field {{b}}{{event.preData.name}}{{b}}"
    ),
    "feature-archived": (
        "{{b}}{{user}}{{b}} archived {{b}}{{event.featureName}}{{b}} in project "
        "{{b}}{{project}}{{b}}"
    ),
    "feature-created": (
        "{{b}}{{user}}{{b}} created {{b}}{{feature}}{{b}} in project {{b}}{{project}}{{b}}"
    ),
    "feature-deleted": (
        "{{b}}{{user}}{{b}} deleted {{b}}{{event.featureName}}{{b}} in project "
        "{{b}}{{project}}{{b}}"
    ),
    "feature-environment-disabled": (
        "{{b}}{{user}}{{b}} disabled {{b}}{{feature}}{{b}} for the "
        "{{b}}{{event.environment}}{{b}} environment in project {{b}}{{project}}{{b}}"
    ),
    "feature-environment-enabled": (
        "{{b}}{{user}}{{b}} enabled {{b}}{{feature}}{{b}} for the "
        "{{b}}{{event.environment}}{{b}} environment in project {{b}}{{project}}{{b}}"
    ),
    "feature-environment-variants-updated": (
        "{{b}}{{user}}{{b}} updated variants for {{b}}{{feature}}{{b}} for the "
        "{{b}}{{event.environment}}{{b}} environment in project {{b}}{{project}}{{b}}"
    ),
    "feature-metadata-updated": (
        "{{b}}{{user}}{{b}} updated {{b}}{{feature}}{{b}} metadata in project {{b}}{{project}}{{b}}"
    ),
    "feature-completed": (
        "{{b}}{{feature}}{{b}} was marked as completed in project {{b}}{{project}}{{b}}"
    ),
    "feature-potentially-stale-on": (
        "{{b}}{{feature}}{{b}} was marked as potentially stale in project {{b}}{{project}}{{b}}"
    ),
    "feature-project-change": (
        "{{b}}{{user}}{{b}} moved {{b}}{{feature}}{{b}} from "
        "{{b}}{{event.data.oldProject}}{{b}} to {{b}}{{project}}{{b}}"
    ),
    "feature-revived": (
        "{{b}}{{user}}{{b}} revived {{b}}{{feature}}{{b}} in project {{b}}{{project}}{{b}}"
    ),
    "feature-stale-off": (
        "{{b}}{{user}}{{b}} removed the stale marking on {{b}}{{feature}}{{b}} in project "
        "{{b}}{{project}}{{b}}"
    ),
    "feature-stale-on": (
        "{{b}}{{user}}{{b}} marked {{b}}{{feature}}{{b}} as stale in project {{b}}{{project}}{{b}}"
    ),
    "feature-strategy-add": (
        "{{b}}{{user}}{{b}} added strategy {{b}}{{strategyTitle}}{{b}} to "
        "{{b}}{{feature}}{{b}} for the {{b}}{{event.environment}}{{b}} environment in project "
        "{{b}}{{project}}{{b}}"
    ),
    "feature-strategy-remove": (
        "{{b}}{{user}}{{b}} removed strategy {{b}}{{strategyTitle}}{{b}} from "
        "{{b}}{{feature}}{{b}} for the {{b}}{{event.environment}}{{b}} environment in project "
        "{{b}}{{project}}{{b}}"
    ),
    "feature-strategy-update": (
        "{{b}}{{user}}{{b}} updated {{b}}{{feature}}{{b}} in project {{b}}{{project}}{{b}} "
        "{{strategyChangeText}}"
    ),
    "feature-tagged": (
        "{{b}}{{user}}{{b}} tagged {{b}}{{feature}}{{b}} with "
        "{{b}}{{event.data.type}}:{{event.data.value}}{{b}} in project {{b}}{{project}}{{b}}"
    ),
    "feature-untagged": (
        "{{b}}{{user}}{{b}} untagged {{b}}{{feature}}{{b}} with "
        "{{b}}{{event.preData.type}}:{{event.preData.value}}{{b}} in project "
        "{{b}}{{project}}{{b}}"
    ),
    "group-created": "{{b}}{{user}}{{b}} created group {{b}}{{event.data.name}}{{b}}",
    "group-deleted": "{{b}}{{user}}{{b}} deleted group {{b}}{{event.preData.name}}{{b}}",
    "group-updated": "{{b}}{{user}}{{b}} updated group {{b}}{{event.preData.name}}{{b}}",
    "banner-created": "{{b}}{{user}}{{b}} created banner {{b}}{{event.data.message}}{{b}}",
    "banner-deleted": "{{b}}{{user}}{{b}} deleted banner {{b}}{{event.preData.message}}{{b}}",
    "banner-updated": "{{b}}{{user}}{{b}} updated banner {{b}}{{event.preData.message}}{{b}}",
    "project-created": "{{b}}{{user}}{{b}} created project {{b}}{{project}}{{b}}",
    "project-archived": "{{b}}{{user}}{{b}} archived project {{b}}{{event.project}}{{b}}",
    "project-deleted": "{{b}}{{user}}{{b}} deleted project {{b}}{{event.project}}{{b}}",
    "segment-created": "{{b}}{{user}}{{b}} created segment {{b}}{{event.data.name}}{{b}}",
    "segment-deleted": "{{b}}{{user}}{{b}} deleted segment {{b}}{{event.preData.name}}{{b}}",
    "segment-updated": "{{b}}{{user}}{{b}} updated segment {{b}}{{event.preData.name}}{{b}}",
    "service-account-created": (
        "{{b}}{{user}}{{b}} created service account {{b}}{{event.data.name}}{{b}}"
    ),
    "service-account-token-created": (
        "{{b}}{{user}}{{b}} created a token for service account {{b}}{{event.data.ownerId}}{{b}}"
    ),
    "service-account-token-deleted": (
        "{{b}}{{user}}{{b}} deleted a token for service account {{b}}{{event.data.ownerId}}{{b}}"
    ),
    "service-account-deleted": (
        "{{b}}{{user}}{{b}} deleted service account {{b}}{{event.preData.name}}{{b}}"
    ),
    "service-account-updated": (
        "{{b}}{{user}}{{b}} updated service account {{b}}{{event.preData.name}}{{b}}"
    ),
    "user-created": "{{b}}{{user}}{{b}} created user {{b}}{{event.data.name}}{{b}}",
    "user-deleted": "{{b}}{{user}}{{b}} deleted user {{b}}{{event.preData.name}}{{b}}",
    "user-updated": "{{b}}{{user}}{{b}} updated user {{b}}{{event.preData.name}}{{b}}",
    "release-plan-added": (
        "{{b}}{{user}}{{b}} added release plan {{b}}{{event.data.name}}{{b}} to "
        "{{b}}{{feature}}{{b}} for the {{b}}{{event.environment}}{{b}} environment in project "
        "{{b}}{{project}}{{b}}"
    ),
    "release-plan-removed": (
        "{{b}}{{user}}{{b}} removed release plan {{b}}{{event.preData.name}}{{b}} from "
        "{{b}}{{feature}}{{b}} for the {{b}}{{event.environment}}{{b}} environment in project "
        "{{b}}{{project}}{{b}}"
    ),
    "release-plan-milestone-started": (
        "{{b}}{{user}}{{b}} started milestone {{b}}{{event.data.milestoneName}}{{b}} in "
        "release plan {{b}}{{event.data.name}}{{b}} for {{b}}{{feature}}{{b}} for the "
        "{{b}}{{event.environment}}{{b}} environment in project {{b}}{{project}}{{b}}"
    ),
    "release-plan-progressions-paused": (
        "{{b}}Release plan progressions paused{{b}} by safeguard for {{b}}{{feature}}{{b}} in "
        "the {{b}}{{event.environment}}{{b}} environment in project {{b}}{{project}}{{b}}"
    ),
    "release-plan-progressions-resumed": (
        "{{b}}{{user}}{{b}} resumed release plan progressions for {{b}}{{feature}}{{b}} in the "
        "{{b}}{{event.environment}}{{b}} environment in project {{b}}{{project}}{{b}}"
    ),
    "user-access-request-registered": "{{b}}{{event.data.email}}{{b}} requested access to Unleash",
    "user-access-request-approved": (
        "{{b}}{{user}}{{b}} approved access request for {{b}}{{event.data.email}}{{b}}"
    ),
    "user-access-request-rejected": (
        "{{b}}{{user}}{{b}} rejected access request for {{b}}{{event.data.email}}{{b}}"
    ),
}

FORMATTED_EVENT_TYPES: Final = frozenset(_ACTION_SOURCES)

_ACTIONS: Final[Mapping[str, mustache.Template]] = {
    event_type: mustache.compile_template(source) for event_type, source in _ACTION_SOURCES.items()
}

# Unleash's EVENT_MAP paths, verbatim: the "Open in Unleash" link the integrations send
# (a Mustache template too; a type without one gets no link).
_CHANGE_REQUEST: Final = (
    "/projects/{{event.project}}/change-requests/{{event.data.changeRequestId}}"
)
_FEATURE: Final = "/projects/{{event.project}}/features/{{event.featureName}}"
_PATH_SOURCES: Final[Mapping[str, str]] = {
    "addon-config-created": "/integrations",
    "addon-config-deleted": "/integrations",
    "addon-config-updated": "/integrations",
    "api-token-created": "/admin/api",
    "api-token-deleted": "/admin/api",
    "change-added": _CHANGE_REQUEST,
    "change-discarded": _CHANGE_REQUEST,
    "change-edited": _CHANGE_REQUEST,
    "change-request-applied": _CHANGE_REQUEST,
    "change-request-approval-added": _CHANGE_REQUEST,
    "change-request-approved": _CHANGE_REQUEST,
    "change-request-cancelled": _CHANGE_REQUEST,
    "change-request-created": _CHANGE_REQUEST,
    "change-request-discarded": _CHANGE_REQUEST,
    "change-request-rejected": _CHANGE_REQUEST,
    "change-request-sent-to-review": _CHANGE_REQUEST,
    "change-request-scheduled": _CHANGE_REQUEST,
    "change-request-scheduled-application-success": _CHANGE_REQUEST,
    "change-request-scheduled-application-failure": _CHANGE_REQUEST,
    "change-request-schedule-suspended": _CHANGE_REQUEST,
    "context-field-created": "/context",
    "context-field-deleted": "/context",
    "context-field-updated": "/context",
    "feature-archived": "/projects/{{event.project}}/archive",
    "feature-created": _FEATURE,
    "feature-deleted": "/projects/{{event.project}}",
    "feature-environment-disabled": _FEATURE,
    "feature-environment-enabled": _FEATURE,
    "feature-environment-variants-updated": _FEATURE + "/variants",
    "feature-metadata-updated": _FEATURE,
    "feature-completed": _FEATURE,
    "feature-potentially-stale-on": _FEATURE,
    "feature-project-change": _FEATURE,
    "feature-revived": _FEATURE,
    "feature-stale-off": _FEATURE,
    "feature-stale-on": _FEATURE,
    "feature-strategy-add": _FEATURE,
    "feature-strategy-remove": _FEATURE,
    "feature-strategy-update": _FEATURE,
    "feature-tagged": _FEATURE,
    "feature-untagged": _FEATURE,
    "group-created": "/admin/groups",
    "group-deleted": "/admin/groups",
    "group-updated": "/admin/groups",
    "banner-created": "/admin/message-banners",
    "banner-deleted": "/admin/message-banners",
    "banner-updated": "/admin/message-banners",
    "project-created": "/projects",
    "project-archived": "/projects-archive",
    "project-deleted": "/projects",
    "segment-created": "/segments",
    "segment-deleted": "/segments",
    "segment-updated": "/segments",
    "service-account-created": "/admin/service-accounts",
    "service-account-token-created": "/admin/service-accounts",
    "service-account-token-deleted": "/admin/service-accounts",
    "service-account-deleted": "/admin/service-accounts",
    "service-account-updated": "/admin/service-accounts",
    "user-created": "/admin/users",
    "user-deleted": "/admin/users",
    "user-updated": "/admin/users",
    "release-plan-added": _FEATURE,
    "release-plan-removed": _FEATURE,
    "release-plan-milestone-started": _FEATURE,
    "release-plan-progressions-paused": _FEATURE,
    "release-plan-progressions-resumed": _FEATURE,
    "user-access-request-registered": "/admin/users",
    "user-access-request-approved": "/admin/users",
    "user-access-request-rejected": "/admin/users",
}
_PATHS: Final[Mapping[str, mustache.Template]] = {
    event_type: mustache.compile_template(source) for event_type, source in _PATH_SOURCES.items()
}

_OPERATOR_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "IN": "is one of",
    "NOT_IN": "is not one of",
    "STR_CONTAINS": "is a string that contains",
    "STR_STARTS_WITH": "is a string that starts with",
    "STR_ENDS_WITH": "is a string that ends with",
    "NUM_EQ": "is a number equal to",
    "NUM_GT": "is a number greater than",
    "NUM_GTE": "is a number greater than or equal to",
    "NUM_LT": "is a number less than",
    "NUM_LTE": "is a number less than or equal to",
    "DATE_BEFORE": "is a date before",
    "DATE_AFTER": "is a date after",
    "SEMVER_EQ": "is a SemVer equal to",
    "SEMVER_GT": "is a SemVer greater than",
    "SEMVER_LT": "is a SemVer less than",
    "SEMVER_GTE": "is a SemVer greater than or equal to",
    "SEMVER_LTE": "is a SemVer less than or equal to",
    "REGEX": "matches regex",
}

# Unleash looks the type up in a plain object, so these names find Object.prototype's
# members instead of a missing entry; they have no template and mustache.js throws.
_OBJECT_PROTOTYPE_NAMES: Final = frozenset(
    {
        "__defineGetter__",
        "__defineSetter__",
        "__lookupGetter__",
        "__lookupSetter__",
        "__proto__",
        "constructor",
        "hasOwnProperty",
        "isPrototypeOf",
        "propertyIsEnumerable",
        "toLocaleString",
        "toString",
        "valueOf",
    }
)

# Unleash's event store reads the columns render.EVENT_FIELDS and GROUP_FIELDS name and
# hands integrations exactly these.


class UnformattableEventError(ValueError):
    """Unleash's formatter throws on this event, so Unleash sends no webhook for it."""


class _Undefined:
    """JavaScript's `undefined`, which the formatter tells apart from `null`."""

    def __repr__(self) -> str:
        return "undefined"


_UNDEFINED: Final = _Undefined()


def format_event_markdown(event: Event, unleash_url: str) -> str:
    """The `eventMarkdown` text Unleash's webhook integration would render for `event`.

    `event` is one event as the admin API returns it; `unleash_url` is Unleash's public
    URL (its `unleashUrl` option), used verbatim in links.
    """
    return format_event(event, unleash_url)[0]


def format_event(
    event: Event, unleash_url: str, *, slack_links: bool = False
) -> tuple[str, str | None]:
    """Unleash's formatter output for `event`: the text, and the link into Unleash's UI
    for the event's type (None for a type Unleash gives no link). `slack_links` writes
    links as Slack's `<url|text>` (Unleash's LinkStyle.SLACK) instead of Markdown."""
    held = _as_held_by_unleash(event)
    links = _Links(unleash_url, held, slack=slack_links)
    view: dict[str, object] = {
        "user": held["createdBy"],
        "event": held,
        "strategyTitle": _strategy_title(held),
        "strategyChangeText": _strategy_change_text(held),
        "changeRequest": links.change_request(),
        "feature": links.feature(),
        "project": links.project(),
        "b": _BOLD,
    }
    # A name that is absent and one that holds `undefined` render alike at the top level.
    view = {name: value for name, value in view.items() if value is not _UNDEFINED}
    try:
        text = _action_for(held).render(view, mustache.escape_none)
        path = _PATHS.get(_js_string(held["type"]))
        url = None if path is None else unleash_url + path.render(view, mustache.escape_none)
    except mustache.RenderError as exc:
        raise UnformattableEventError(str(exc)) from None
    return text, url


def _as_held_by_unleash(event: Event) -> dict[str, object]:
    """The event as Unleash's store hands it to integrations."""
    held = {name: event.get(name) for name in EVENT_FIELDS}
    if not _truthy(held["tags"]):
        held["tags"] = []
    created_at = held["createdAt"]
    # Unleash never serves an unparsable date; if one comes, keep what we were given.
    if isinstance(created_at, str):
        with contextlib.suppress(ValueError):
            held["createdAt"] = JSDate.from_iso(created_at)
    # The store writes `group_type || undefined`, so falsy group columns vanish.
    held.update({name: event[name] for name in GROUP_FIELDS if _truthy(event.get(name))})
    return held


def _action_for(held: Mapping[str, object]) -> mustache.Template:
    event_type = _js_string(held["type"])
    action = _ACTIONS.get(event_type)
    if action is not None:
        return action
    if event_type in _OBJECT_PROTOTYPE_NAMES:
        raise UnformattableEventError(f"event type {event_type!r} has no template")
    return _compile_fallback(f"{_bold(held['createdBy'])} triggered {_bold(held['type'])}")


@functools.lru_cache(maxsize=256)
def _compile_fallback(source: str) -> mustache.Template:
    # Unleash renders this text as a template too, so a user name or an event type
    # containing Mustache tags is interpreted, and a malformed one makes it throw.
    try:
        return mustache.compile_template(source)
    except mustache.TemplateError as exc:
        raise UnformattableEventError(f"fallback text is not a valid template: {exc}") from None


def _bold(value: object) -> str:
    return f"{_BOLD}{_js_string(value)}{_BOLD}" if _truthy(value) else _BOLD


class _Links:
    """Markdown links into Unleash's UI, as the formatter writes them."""

    def __init__(self, unleash_url: str, held: Mapping[str, object], *, slack: bool) -> None:
        self._url = unleash_url
        self._held = held
        self._slack = slack

    def _link(self, text: str, url: str) -> str:
        return f"<{url}|{text}>" if self._slack else f"[{text}]({url})"

    def feature(self) -> object:
        name = self._held["featureName"]
        if not _truthy(name):
            return _UNDEFINED
        return self._link(_js_string(name), self._feature_url())

    def _feature_url(self) -> str:
        project = self._held["project"]
        # No 8.2.0 sentence shows an archived flag's link; kept so links match Unleash's.
        if self._held["type"] == FEATURE_ARCHIVED:
            if _truthy(project):
                return f"{self._url}/projects/{_js_string(project)}/archive"
            return f"{self._url}/archive"
        # The store gives a missing project as null, which prints as "null" here.
        name = _js_string(self._held["featureName"])
        return f"{self._url}/projects/{_js_string(project)}/features/{name}"

    def project(self) -> object:
        project = self._held["project"]
        if not _truthy(project):
            return _UNDEFINED
        name = _js_string(project)
        return self._link(name, f"{self._url}/projects/{name}")

    def change_request(self) -> object:
        held = self._held
        request_id = _optional_read(held["data"], "changeRequestId")
        if not _truthy(request_id):
            request_id = _optional_read(held["preData"], "changeRequestId")
        project = held["project"]
        if not (_truthy(project) and _truthy(request_id)):
            return _UNDEFINED
        request = _js_string(request_id)
        url = f"{self._url}/projects/{_js_string(project)}/change-requests/{request}"
        feature = self.feature()
        environment = held["environment"]
        return "".join(
            (
                _bold(self._link(f"#{request}", url)),
                f" for feature flag {_bold(feature)}" if _truthy(feature) else "",
                f" in the {_bold(environment)} environment" if _truthy(environment) else "",
                f" in project {_bold(self.project())}",
            )
        )


def _strategy_title(held: Mapping[str, object]) -> object:
    before, after = held["preData"], held["data"]
    candidates = (
        _optional_read(before, "title"),
        _optional_read(after, "title"),
        _optional_read(before, "name"),
        _optional_read(after, "name"),
    )
    # JavaScript's `a || b || c || d`: the first truthy operand, else the last one.
    return next((value for value in candidates if _truthy(value)), candidates[-1])


def _strategy_change_text(held: Mapping[str, object]) -> object:
    before, after = held["preData"], held["data"]
    subject = after if _truthy(after) else before
    if held["type"] != FEATURE_STRATEGY_UPDATE or not _truthy(subject):
        return _UNDEFINED
    lead = f"by updating strategy {_bold(_strategy_title(held))} in {_bold(held['environment'])}"
    strategy = _read(subject, "name")
    if strategy == "flexibleRollout":
        details = _rollout_changes(before, after)
    elif strategy == "remoteAddress":
        details = [_list_parameter_change(before, after, "IPs")]
    elif strategy == "applicationHostname":
        details = [_list_parameter_change(before, after, "hostNames")]
    elif strategy != "default":
        return lead
    else:
        details = []
    details += [_constraints_change(before, after), _segments_change(before, after)]
    return lead + ";".join(detail for detail in details if detail)


def _rollout_changes(before: object, after: object) -> list[str]:
    old = _optional_read(before, "parameters")
    new = _optional_read(after, "parameters")
    old = old if _truthy(old) else {}
    new = new if _truthy(new) else {}
    return [
        _value_change("stickiness", _read(old, "stickiness"), _read(new, "stickiness")),
        _value_change("rollout", _read(old, "rollout"), _read(new, "rollout"), "%"),
        _value_change("groupId", _read(old, "groupId"), _read(new, "groupId")),
    ]


def _value_change(label: str, old: object, new: object, unit: str = "") -> str:
    if _strictly_equal(old, new):
        return ""
    if not _truthy(old):
        return f" {label} to {_js_string(new)}{unit}"
    return f" {label} from {_js_string(old)}{unit} to {_js_string(new)}{unit}"


def _list_parameter_change(before: object, after: object, name: str) -> str:
    old = _optional_read(before, "parameters", name)
    new = _optional_read(after, "parameters", name)
    if _strictly_equal(old, new):
        return ""
    if not _truthy(before):
        return f" {name} to {_values_text(new, name)}"
    return f" {name} from {_values_text(old, name)} to {_values_text(new, name)}"


def _values_text(values: object, name: str) -> str:
    if _is_zero(_length(values)):
        return f"empty set of {name}"
    return f"[{_js_string(values)}]"


def _constraints_change(before: object, after: object) -> str:
    old = _constraints_text(_defaulted(_optional_read(before, "constraints")))
    new = _constraints_text(_defaulted(_optional_read(after, "constraints")))
    return "" if old == new else f" constraints from {old} to {new}"


def _constraints_text(constraints: object) -> str:
    if _is_zero(_length(constraints)):
        return "empty set of constraints"
    if not isinstance(constraints, list):
        raise UnformattableEventError("constraints is not an array")
    return f"[{', '.join(_constraint_text(constraint) for constraint in constraints)}]"


def _constraint_text(constraint: object) -> str:
    if _has_own(constraint, "value"):
        value = _js_string(_read(constraint, "value"))
    else:
        value = f"({_joined_values(constraint)})"
    operator = _read(constraint, "operator")
    # Unleash looks the operator up as a property key, which is its string form.
    description = _OPERATOR_DESCRIPTIONS.get(_js_string(operator), _js_string(operator))
    negation = "not " if _truthy(_read(constraint, "inverted")) else ""
    return f"{_js_string(_read(constraint, 'contextName'))} {negation}{description} {value}"


def _joined_values(constraint: object) -> str:
    if isinstance(constraint, list):
        # `values` is then Array.prototype.values, a function without `join`.
        raise UnformattableEventError("constraint is an array")
    values = _read(constraint, "values")
    if _nullish(values):
        return "undefined"
    if not isinstance(values, list):
        raise UnformattableEventError("constraint values are not an array")
    return _js_string(values)


def _segments_change(before: object, after: object) -> str:
    old = _segments_text(_defaulted(_optional_read(before, "segments")))
    new = _segments_text(_defaulted(_optional_read(after, "segments")))
    return "" if old == new else f" segments from {old} to {new}"


def _segments_text(segments: object) -> str:
    if _is_zero(_length(segments)):
        return "empty set of segments"
    if not isinstance(segments, list):
        raise UnformattableEventError("segments is not an array")
    return f"({_js_string(segments)})"


def _defaulted(value: object) -> object:
    """A parameter default: `[]` replaces `undefined` but not `null`."""
    return [] if value is _UNDEFINED else value


# --- JavaScript semantics for values parsed from JSON -----------------------------------


def _nullish(value: object) -> bool:
    return value is None or value is _UNDEFINED


def _truthy(value: object) -> bool:
    if _nullish(value):
        return False
    if isinstance(value, bool | str):
        return bool(value)
    if isinstance(value, int | float):
        return value != 0 and not math.isnan(value)
    return True  # objects and arrays are truthy even when empty


def _read(value: object, name: str) -> object:
    """`value.name`, which throws on null and undefined."""
    if _nullish(value):
        raise UnformattableEventError(f"cannot read {name!r} of {_js_string(value)}")
    if isinstance(value, Mapping):
        return value.get(name, _UNDEFINED)
    return _UNDEFINED


def _optional_read(value: object, *names: str) -> object:
    """`value?.a.b`: only the first step is optional."""
    if _nullish(value):
        return _UNDEFINED
    for name in names:
        value = _read(value, name)
    return value


def _has_own(value: object, name: str) -> bool:
    """`value.hasOwnProperty(name)`."""
    if _nullish(value):
        raise UnformattableEventError(f"cannot read 'hasOwnProperty' of {_js_string(value)}")
    if not isinstance(value, Mapping):
        return False
    if "hasOwnProperty" in value:
        raise UnformattableEventError("hasOwnProperty is shadowed by a JSON value")
    return name in value


def _length(value: object) -> object:
    """`value.length`."""
    if isinstance(value, list):
        return len(value)
    if isinstance(value, str):
        return utf16_length(value)
    return _read(value, "length")


def _is_zero(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _strictly_equal(left: object, right: object) -> bool:
    """JavaScript's `===` between two values parsed from separate JSON documents."""
    if isinstance(left, Mapping | list) or isinstance(right, Mapping | list):
        return False  # separately parsed objects are never the same object
    if _is_number(left) and _is_number(right):
        return _as_double(left) == _as_double(right)
    return type(left) is type(right) and left == right


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_double(value: object) -> float:
    assert isinstance(value, int | float)
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _js_string(value: object) -> str:
    """`String(value)`, including `undefined`."""
    return "undefined" if value is _UNDEFINED else to_js_string(value)
