"""Client TLS contexts against a real aiohttp HTTPS server on 127.0.0.1, with certificates
made on the fly by trustme."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from poller.tls import TlsConfigError, client_ssl_context


@dataclass
class Pki:
    """A CA and the PEM files a config would name."""

    ca: trustme.CA
    ca_file: Path
    client_cert_file: Path
    client_key_file: Path
    client_combined_file: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA, its certificate and a client certificate with key, written as PEM files."""
    ca = trustme.CA()
    client = ca.issue_cert("poller.client.test")
    paths = Pki(
        ca,
        tmp_path / "ca.pem",
        tmp_path / "client.pem",
        tmp_path / "client.key",
        tmp_path / "client-with-key.pem",
    )
    ca.cert_pem.write_to_path(paths.ca_file)
    client.cert_chain_pems[0].write_to_path(paths.client_cert_file)
    client.private_key_pem.write_to_path(paths.client_key_file)
    client.private_key_and_cert_chain_pem.write_to_path(paths.client_combined_file)
    return paths


@dataclass
class Server:
    url: str
    # The DNS names in the client certificate the server saw, one entry per request.
    client_names: list[list[str]] = field(default_factory=list)


def _server_context(
    ca: trustme.CA, identity: str, *, require_client_cert: bool = False
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(identity).configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@asynccontextmanager
async def https_server(context: ssl.SSLContext) -> AsyncIterator[Server]:
    """A real HTTPS server on 127.0.0.1 answering 200 to GET /."""
    server = Server("")

    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        server.client_names.append(
            [value for kind, value in (peer or {}).get("subjectAltName", ()) if kind == "DNS"]
        )
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server.url = f"https://127.0.0.1:{runner.addresses[0][1]}/"
        yield server
    finally:
        await runner.cleanup()


async def _get(url: str, client_context: ssl.SSLContext | None) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url,
            ssl=client_context if client_context is not None else True,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response,
    ):
        assert response.status == 200
        return await response.text()


def test_nothing_configured_means_aiohttps_default() -> None:
    """With no file configured there is no custom context: aiohttp's verified default."""
    assert client_ssl_context(None, None, None) is None


def test_every_context_verifies(pki: Pki) -> None:
    """Whatever is configured, the context requires a valid certificate for the host."""
    for args in [
        (pki.ca_file, None, None),
        (None, pki.client_cert_file, pki.client_key_file),
        (pki.ca_file, pki.client_combined_file, None),
    ]:
        context = client_ssl_context(*args)
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname


def test_ca_file_is_trusted(pki: Pki) -> None:
    """A server certified by the CA in ca_file is accepted."""

    async def scenario() -> None:
        async with https_server(_server_context(pki.ca, "127.0.0.1")) as server:
            assert await _get(server.url, client_ssl_context(pki.ca_file, None, None)) == "hello"

    asyncio.run(scenario())


def test_without_ca_file_the_private_ca_is_not_trusted(pki: Pki) -> None:
    """Without ca_file, aiohttp's default and our mTLS-only context both refuse the server."""

    async def scenario() -> None:
        async with https_server(_server_context(pki.ca, "127.0.0.1")) as server:
            for context in [
                None,
                client_ssl_context(None, pki.client_cert_file, pki.client_key_file),
            ]:
                with pytest.raises(
                    aiohttp.ClientConnectorCertificateError,
                    match="unable to get local issuer certificate",
                ):
                    await _get(server.url, context)

    asyncio.run(scenario())


def test_system_store_is_still_trusted_with_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ca_file adds to the system store rather than replacing it (OpenSSL reads the system
    store from SSL_CERT_FILE, pointed here at a second CA)."""
    system_ca, private_ca = trustme.CA(), trustme.CA()
    monkeypatch.setenv("SSL_CERT_FILE", str(_write_ca(system_ca, tmp_path / "system.pem")))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = client_ssl_context(_write_ca(private_ca, tmp_path / "private.pem"), None, None)

    async def scenario() -> None:
        for ca in (system_ca, private_ca):
            async with https_server(_server_context(ca, "127.0.0.1")) as server:
                assert await _get(server.url, context) == "hello"

    asyncio.run(scenario())


def test_certificate_for_another_host_is_refused(pki: Pki) -> None:
    """A server certificate from the trusted CA but for another name fails verification."""

    async def scenario() -> None:
        async with https_server(_server_context(pki.ca, "other.example")) as server:
            with pytest.raises(aiohttp.ClientConnectorCertificateError, match="mismatch"):
                await _get(server.url, client_ssl_context(pki.ca_file, None, None))

    asyncio.run(scenario())


@pytest.mark.parametrize("combined", [False, True], ids=["key-file", "key-in-cert-file"])
def test_mtls_server_accepts_our_client_certificate(pki: Pki, combined: bool) -> None:
    """A server that requires client certificates accepts ours and sees who we are."""
    cert, key = (
        (pki.client_combined_file, None)
        if combined
        else (pki.client_cert_file, pki.client_key_file)
    )

    async def scenario() -> None:
        context = _server_context(pki.ca, "127.0.0.1", require_client_cert=True)
        async with https_server(context) as server:
            assert await _get(server.url, client_ssl_context(pki.ca_file, cert, key)) == "hello"
            assert server.client_names == [["poller.client.test"]]

    asyncio.run(scenario())


def test_mtls_server_rejects_a_client_without_certificate(pki: Pki) -> None:
    """The same server refuses a client that trusts it but presents no certificate."""

    async def scenario() -> None:
        context = _server_context(pki.ca, "127.0.0.1", require_client_cert=True)
        async with https_server(context) as server:
            # TLS 1.3 finishes the client's side of the handshake before the server checks
            # for a certificate, so the refusal arrives as a dropped connection.
            with pytest.raises(aiohttp.ClientConnectionError):
                await _get(server.url, client_ssl_context(pki.ca_file, None, None))
            assert server.client_names == []

    asyncio.run(scenario())


def _write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(path)
    return path


def _encrypted_key(pki: Pki, path: Path) -> Path:
    key = serialization.load_pem_private_key(pki.client_key_file.read_bytes(), None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    return path


BAD_FILES = [
    # which argument is replaced (by what), -> field, message fragment
    ("ca", "missing", "ca_file", "cannot read {path}: No such file or directory"),
    ("ca", "directory", "ca_file", "cannot read {path}: Is a directory"),
    ("ca", "junk", "ca_file", "no PEM certificate in {path}"),
    ("ca", "client_key", "ca_file", "no PEM certificate in {path}"),
    ("cert", "missing", "client_cert_file", "cannot read {path}"),
    ("cert", "junk", "client_cert_file", "no PEM certificate in {path}"),
    ("cert", "client_key", "client_cert_file", "no PEM certificate in {path}"),
    ("key", "missing", "client_key_file", "cannot read {path}"),
    ("key", "junk", "client_key_file", "no PEM private key in {path}"),
    (
        "key",
        "other_key",
        "client_key_file",
        "private key in {path} does not match the certificate in {cert}",
    ),
    ("key", "encrypted", "client_key_file", "private key in {path} is encrypted"),
    ("key", "none", "client_cert_file", "no PEM private key in {cert} (give client_key_file"),
]


@pytest.mark.parametrize(("which", "bad", "field", "message"), BAD_FILES)
def test_bad_files_name_their_field_and_file(
    pki: Pki, tmp_path: Path, which: str, bad: str, field: str, message: str
) -> None:
    """Each unusable file raises TlsConfigError naming the config key, the file and why."""
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    pki.ca.issue_cert("x.test").private_key_pem.write_to_path(tmp_path / "other.key")
    replacement = {
        "missing": tmp_path / "missing.pem",
        "directory": tmp_path,
        "junk": tmp_path / "junk.pem",
        "client_key": pki.client_key_file,
        "other_key": tmp_path / "other.key",
        "encrypted": _encrypted_key(pki, tmp_path / "encrypted.key"),
        "none": None,
    }[bad]
    args: dict[str, Path | None] = {
        "ca": pki.ca_file,
        "cert": pki.client_cert_file,
        "key": pki.client_key_file,
    }
    args[which] = replacement
    with pytest.raises(TlsConfigError) as raised:
        client_ssl_context(args["ca"], args["cert"], args["key"])
    assert raised.value.field == field
    assert message.format(path=replacement, cert=pki.client_cert_file) in str(raised.value)


def test_key_without_certificate_is_refused(pki: Pki) -> None:
    """A client key alone is a mistake, reported against client_key_file."""
    with pytest.raises(TlsConfigError, match="needs client_cert_file") as raised:
        client_ssl_context(None, None, pki.client_key_file)
    assert raised.value.field == "client_key_file"


def test_error_is_a_value_error(pki: Pki, tmp_path: Path) -> None:
    """TlsConfigError is a ValueError, so generic config validation can catch it."""
    with pytest.raises(ValueError, match="cannot read"):
        client_ssl_context(tmp_path / "nope.pem", None, None)
