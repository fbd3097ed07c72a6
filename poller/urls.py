"""URL helpers: a form of a URL that is safe to log, and the proxy to reach one through."""

from __future__ import annotations

import contextlib
import re
import urllib.request
from urllib.parse import unquote, urlsplit

from yarl import URL

MALFORMED = "<malformed URL>"
REDACTED_PATH = "/<redacted>"
# Anything that looks like an absolute URL in an error text, up to a quote, a space or
# the end of a bracketed repr.
_ANY_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{},]+")


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` and nothing else: user info, path, query and fragment go,
    because webhook URLs (Slack's, Teams', signed ones) carry their secret there."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        # An invalid port often means a password with an unescaped '/', '?' or '#': the
        # "host" we would print is then really part of the user info.
        return MALFORMED
    if not parts.scheme or not host:
        return MALFORMED
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def redact_database_url(url: str) -> str:
    """A database URL as messages may show it: ``postgresql://user:***@host:port/db``.
    The password is masked and the query dropped (it may hold ``password=`` too)."""
    try:
        parts = urlsplit(url)  # a stray '[' or ']' in the password is an "invalid IPv6 URL"
        host, port = parts.hostname, parts.port
    except ValueError:
        return MALFORMED
    # An '@' after the host means a password with an unescaped '/', '?' or '#': the
    # "path" would be the rest of that password.
    if not parts.scheme or "@" in parts.path + parts.query + parts.fragment:
        return MALFORMED
    if host and ":" in host:
        host = f"[{host}]"
    user = ""
    if parts.username is not None:
        user = parts.username + (":***" if parts.password is not None else "") + "@"
    elif parts.password is not None:
        user = ":***@"
    where = (host or "") + (f":{port}" if port is not None else "")
    return f"{parts.scheme}://{user}{where}{parts.path}"


def scrub_urls(text: str, *known: str | None) -> str:
    """`text` (an error message, say) with every URL in it cut down to what redact_url
    keeps, and the path and query of each `known` URL removed wherever they appear on
    their own (a receiver may echo our request line into its malformed answer).

    Spelling variants are covered: as configured, as yarl encodes it for the wire, and
    percent-decoded."""
    for url in known:
        if not url:
            continue
        for variant in sorted(_spellings(url), key=len, reverse=True):
            text = text.replace(variant, redact_url(url))
        for tail in sorted(_tails(url), key=len, reverse=True):
            text = text.replace(tail, REDACTED_PATH)
    return _ANY_URL.sub(lambda match: redact_url(match.group()), text)


def _spellings(url: str) -> set[str]:
    spellings = {url, unquote(url)}
    with contextlib.suppress(ValueError):  # a URL yarl refuses was never sent
        spellings.add(str(URL(url)))
    return spellings


def _tails(url: str) -> set[str]:
    """The parts after host and port that carry a webhook's secret: the path with its
    query, the query alone, and the path alone, each in every spelling."""
    tails: set[str] = set()
    for spelling in _spellings(url):
        parts = urlsplit(spelling)
        path_query = parts.path + (f"?{parts.query}" if parts.query else "")
        tails.update({path_query, parts.query, parts.path, parts.fragment})
        if parts.username or parts.password:
            tails.update({parts.username or "", parts.password or ""})
    # "/" or an empty query gives nothing away, and replacing it would mangle the text.
    return {tail for tail in tails if len(tail.strip("/")) >= 2}


def proxy_for(url: str, proxy: str | None, trust_env: bool) -> str | None:
    """The proxy to send a request for `url` through, or None to connect directly.

    An explicit `proxy` always wins. Otherwise, only when `trust_env` is set, the
    conventional environment variables are honoured as urllib reads them:
    ``https_proxy`` / ``http_proxy`` by the URL's scheme (lower case before upper case;
    ``HTTP_PROXY`` is ignored under CGI, see httpoxy) and ``no_proxy`` (host names and
    domain suffixes, or ``*``). ``all_proxy`` is not used: it is most often a SOCKS
    proxy, which aiohttp cannot speak.
    """
    if proxy:
        return proxy
    if not trust_env:
        return None
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    chosen = proxies.get(parts.scheme.lower())
    if not chosen:
        return None
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = parts.hostname, None
    # typeshed omits proxy_bypass_environment; proxy_bypass() would consult macOS's and
    # Windows' system settings instead of the environment we were told to trust.
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if host and bypass(f"{host}:{port}" if port is not None else host, proxies):
        return None
    # curl and most tools accept "proxy.example:3128"; aiohttp needs a scheme.
    return chosen if "://" in chosen else f"http://{chosen}"
