"""Standard Webhooks signatures: known vectors, and the official library accepting ours."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from poller.signing import Signer, SigningSecretError

BODY = b'{"id":42,"type":"feature-created","data":{"name":"f\xc3\xa4ature"}}'
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

# Expected signatures were computed with `openssl dgst -sha256 -mac HMAC -binary | base64`,
# not with this code; the first is the official libraries' own test vector.
VECTORS = [
    # secret, msg_id, timestamp, body, expected webhook-signature
    (
        WHSEC,
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ),
    # base64 without its '=' padding, as some dashboards show it
    (
        "whsec_dW5sZWFzaC1wb2xsZXIgdGVzdCBrZXkgMzIgYnl0ZXM",
        "unleash-event-1",
        1700000000,
        b'{"id":1}',
        "v1,oHg/gSxvbOGVB+LNZtSFAqyftGA7C7ejzWjKvZrCNHs=",
    ),
    (
        "whsec_dW5sZWFzaC1wb2xsZXIgdGVzdCBrZXkgMzIgYnl0ZXM=",
        "unleash-event-1",
        1700000000,
        b'{"id":1}',
        "v1,oHg/gSxvbOGVB+LNZtSFAqyftGA7C7ejzWjKvZrCNHs=",
    ),
    # without the prefix a secret is text: its UTF-8 bytes are the key
    (
        "pässwörd",
        "unleash-event-42",
        1700000042,
        b'{"id":1}',
        "v1,uE3o5kdcTOh4vsR0NijsulPDbNFAYcOnP8w0xbtEMUM=",
    ),
    ("s3cret", "unleash-event-7", 0, b"", "v1,XsD/y0iB3TjEalI/PekUPgAdWLSto/EUIZSLNjJWcKQ="),
    (
        "s3cret",
        "unleash-event-8",
        1700000000,
        b"\xff\x00\xfe",
        "v1,oapX8sB/6VvlPGY2zLwnyYhW7dgWH1OubY5iiNE6saE=",
    ),
]


@pytest.mark.parametrize(("secret", "msg_id", "timestamp", "body", "expected"), VECTORS)
def test_known_vectors(
    secret: str, msg_id: str, timestamp: int, body: bytes, expected: str
) -> None:
    """Each secret form signs `id.timestamp.body` to the independently computed value."""
    headers = Signer(secret).sign(msg_id, timestamp, body)
    assert headers == {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": expected,
    }


@pytest.mark.parametrize(
    ("secret", "receiver_key"),
    [
        (WHSEC, WHSEC),
        (WHSEC, WHSEC.removeprefix("whsec_")),
        ("plain text secret", b"plain text secret"),
    ],
)
def test_official_library_verifies_our_headers(secret: str, receiver_key: str | bytes) -> None:
    """A receiver using the standardwebhooks library accepts what we send."""
    headers = Signer(secret).sign("unleash-event-42", int(time.time()), BODY)
    assert Webhook(receiver_key).verify(BODY, headers) == {
        "id": 42,
        "type": "feature-created",
        "data": {"name": "fäature"},
    }


def test_tampered_body_fails_verification() -> None:
    """One changed byte of the body makes the signature invalid."""
    headers = Signer(WHSEC).sign("unleash-event-42", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(WHSEC).verify(BODY.replace(b"42", b"43"), headers)


def test_tampered_timestamp_fails_verification() -> None:
    """A timestamp moved by one second, still within tolerance, no longer matches."""
    now = int(time.time())
    headers = Signer(WHSEC).sign("unleash-event-42", now, BODY)
    headers["webhook-timestamp"] = str(now - 1)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(WHSEC).verify(BODY, headers)


def test_tampered_id_fails_verification() -> None:
    """The message id is signed too, so a replay under another id is refused."""
    headers = Signer(WHSEC).sign("unleash-event-42", int(time.time()), BODY)
    headers["webhook-id"] = "unleash-event-43"
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(WHSEC).verify(BODY, headers)


def test_old_timestamp_fails_verification() -> None:
    """A correctly signed but ten-minute-old attempt is rejected as a replay."""
    headers = Signer(WHSEC).sign("unleash-event-42", int(time.time()) - 600, BODY)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(WHSEC).verify(BODY, headers)


def test_raw_secret_is_not_read_as_base64() -> None:
    """Text without the prefix is a text key: a receiver reading it as base64 disagrees."""
    headers = Signer("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").sign("e-1", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").verify(BODY, headers)
    Webhook(b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").verify(BODY, headers)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("", "must not be empty"),
        ("whsec_", "no key after"),
        ("whsec_not base64!", "standard base64"),
        ("whsec_a-b_c", "standard base64"),
    ],
)
def test_bad_secrets_are_refused_without_echoing_them(secret: str, problem: str) -> None:
    """An unusable secret fails at construction, and the message does not contain it."""
    with pytest.raises(SigningSecretError, match=problem) as raised:
        Signer(secret)
    if secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in str(raised.value)


def test_repr_and_str_hide_the_secret() -> None:
    """Neither repr() nor str() of a Signer shows any form of its key."""
    signer = Signer("hunter2-very-secret")
    assert "hunter2" not in repr(signer)
    assert "hunter2" not in str(signer)
    assert "hunter2" not in repr([signer])


def test_equal_keys_make_equal_signers() -> None:
    """Two signers are equal exactly when their key bytes are (a reloaded config compares
    equal when the secret did not change)."""
    padded = "whsec_dW5sZWFzaC1wb2xsZXIgdGVzdCBrZXkgMzIgYnl0ZXM="
    assert Signer(padded) == Signer(padded.rstrip("="))
    assert hash(Signer("a")) == hash(Signer("a"))
    assert Signer("a") != Signer("b")
    assert Signer("whsec_YQ==") == Signer("a")  # base64 "YQ==" is the byte "a"


def test_id_with_a_dot_is_refused() -> None:
    """An id containing '.' would make the signed content ambiguous, so it is refused."""
    with pytest.raises(ValueError, match="must not contain"):
        Signer("k").sign("a.1", 2, b"x")


def test_two_keys_during_a_rotation_each_verify() -> None:
    """Signed with the old and the new key, a delivery verifies for a receiver holding
    either one (the spec's space-separated signatures), and not for a third key."""
    new = "whsec_" + base64.b64encode(b"the new key, 24 bytes ok").decode()
    headers = Signer(WHSEC, new).sign("unleash-event-42", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in (WHSEC, new):
        assert Webhook(key).verify(BODY, headers)["id"] == 42
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook("whsec_" + base64.b64encode(b"some other key entirely").decode()).verify(
            BODY, headers
        )
    # After the rotation: the new key alone, which the receiver moved to, still verifies.
    alone = Signer(new).sign("unleash-event-42", int(time.time()), BODY)
    assert Webhook(new).verify(BODY, alone)["id"] == 42
