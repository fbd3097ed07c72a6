"""Client TLS settings: an extra CA to trust and a client certificate for mutual TLS.

Verification can only be extended (more CAs), never turned off: a webhook that carries
secrets or a token to an unverified peer is a leak waiting for a network to be hostile.
Build a context once, at config load, and reuse it: aiohttp pools connections per
context, and loading certificates is blocking file I/O.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path


class TlsConfigError(ValueError):
    """A TLS file is unusable. `field` is the config key it came from (e.g. ``ca_file``);
    the message names the file and the problem, never its contents."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def client_ssl_context(
    ca_file: Path | None, client_cert_file: Path | None, client_key_file: Path | None
) -> ssl.SSLContext | None:
    """A verifying client context trusting the system store plus `ca_file`, presenting
    the client certificate when one is given; None when nothing is configured, which
    means aiohttp's own verified default.

    `client_key_file` may be omitted when the key is in `client_cert_file`. An encrypted
    key is refused rather than prompting on a terminal a daemon does not have.
    """
    if ca_file is None and client_cert_file is None and client_key_file is None:
        return None
    if client_key_file is not None and client_cert_file is None:
        raise TlsConfigError("client_key_file", "needs client_cert_file as well")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    # create_default_context already does this; stating it keeps this module the one
    # place that answers "can verification be off?" with no.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    # As aiohttp's default context: it speaks HTTP/1.1 only.
    context.set_alpn_protocols(["http/1.1"])
    if ca_file is not None:
        _load_ca(context, ca_file)
    if client_cert_file is not None:
        _load_client_cert(context, client_cert_file, client_key_file)
    return context


def _check_readable(field: str, path: Path) -> None:
    # stat, not open: opening a FIFO would wait for a writer and hang `check`.
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TlsConfigError(field, f"cannot read {path}: {exc.strerror}") from None
    except ValueError:  # a NUL in the path
        raise TlsConfigError(field, f"{str(path)!r} is not a valid path") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # open() names a directory
        raise TlsConfigError(field, f"{path} is not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsConfigError(field, f"cannot read {path}: {exc.strerror}") from None


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    _check_readable("ca_file", ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:
        raise TlsConfigError("ca_file", f"no PEM certificate in {ca_file}") from None


def _load_client_cert(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    _check_readable("client_cert_file", cert_file)
    if key_file is not None:
        _check_readable("client_key_file", key_file)
    # load_cert_chain reports a bad certificate and a bad key with the same "PEM lib"
    # error; parsing the certificate alone first tells the operator which file is wrong.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError:
        raise TlsConfigError("client_cert_file", f"no PEM certificate in {cert_file}") from None

    key_field, key_path = (
        ("client_key_file", key_file) if key_file else ("client_cert_file", cert_file)
    )

    def refuse_password() -> bytes:
        raise TlsConfigError(
            key_field,
            f"the private key in {key_path} is encrypted; "
            "give it unencrypted and protect it with file permissions",
        )

    try:
        context.load_cert_chain(cert_file, key_file, password=refuse_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                key_field,
                f"the private key in {key_path} does not match the certificate in {cert_file}",
            ) from None
        hint = "" if key_file else " (give client_key_file if the key is in another file)"
        raise TlsConfigError(key_field, f"no PEM private key in {key_path}{hint}") from None
