"""URL helpers: a form of a URL that is safe to log, and the proxy to reach one through."""

from __future__ import annotations

import urllib.request
from urllib.parse import urlsplit

MALFORMED = "<malformed URL>"


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
