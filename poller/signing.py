"""Standard Webhooks signatures (https://www.standardwebhooks.com), so receivers can check
that a delivery came from us, unaltered, and recently.

A secret is given either in the spec's own form, ``whsec_`` followed by the base64 of the
key bytes (what receivers' Standard Webhooks libraries generate and expect), or as any
other text, whose UTF-8 bytes are then the key. A receiver using an official library must
be given the key bytes for the latter (``Webhook(b"...")`` in Python): those libraries
read a secret string without the prefix as base64, not as text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 - the spec's marker, not a secret


class SigningSecretError(ValueError):
    """The signing secret is unusable; the message never contains the secret."""


class Signer:
    """Signs webhook bodies with one key or more (during a key rotation: the spec puts
    one signature per key in `webhook-signature`, space-separated, and a receiver accepts
    the delivery when any of them verifies). Its repr and str never show the keys."""

    __slots__ = ("_keys",)

    def __init__(self, *secrets: str) -> None:
        if not secrets:
            raise SigningSecretError("must not be empty")
        self._keys = tuple(_key_bytes(secret) for secret in secrets)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers for one attempt to send `body`.

        `msg_id` stays the same across retries (receivers de-duplicate on it);
        `timestamp` (Unix seconds) is the time of this attempt, since receivers reject
        old ones to stop replays.
        """
        if "." in msg_id:
            # The signed content is "id.timestamp.body": a dot in the id would let one
            # (id, timestamp) pair pass for another.
            raise ValueError("msg_id must not contain '.'")
        signed = f"{msg_id}.{timestamp}.".encode() + body
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            for key in self._keys
        )
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signatures,
        }

    def __repr__(self) -> str:
        return "Signer('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Signer)
            and len(self._keys) == len(other._keys)
            and all(hmac.compare_digest(a, b) for a, b in zip(self._keys, other._keys, strict=True))
        )

    def __hash__(self) -> int:
        return hash(tuple(hashlib.sha256(key).digest() for key in self._keys))


def _key_bytes(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        if not secret:
            raise SigningSecretError("must not be empty")
        return secret.encode("utf-8")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        # Pad like the official libraries do, but reject stray characters instead of
        # silently dropping them: a mistyped secret must fail here, not at every receiver.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise SigningSecretError(
            f"a secret starting with {SECRET_PREFIX!r} must continue with standard base64"
        ) from None
    if not key:
        raise SigningSecretError(f"no key after {SECRET_PREFIX!r}")
    return key
