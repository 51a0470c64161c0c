"""Links placed in messages (SPEC §7): the signed unsubscribe link of every message.

The token names the organization, the account and the channel and is signed with the process's
secret key, so nobody can unsubscribe an account they were not sent. Unsubscribe links never
expire: a debtor who opts out from an old message must still be heard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from itsdangerous import BadSignature, Signer, URLSafeSerializer
from itsdangerous.encoding import base64_encode

_SALT = "duecourse-unsubscribe"


@dataclass(frozen=True)
class UnsubscribeTarget:
    organization_id: int
    account_id: int
    channel: str


@lru_cache(maxsize=8)  # one per secret key: every dispatched message signs a link
def _serializer(secret_key: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret_key, salt=_SALT)


@lru_cache(maxsize=8)
def _signer(secret_key: str) -> Signer:
    """The serializer's signer with its key derived once: it would derive the key again (a hash of
    the salt and the secret) for every signature. Same signatures."""
    signer = _serializer(secret_key).make_signer()
    return Signer(signer.derive_key(), key_derivation="none", digest_method=signer.digest_method,
                  algorithm=signer.algorithm, sep=signer.sep)


def unsubscribe_token(secret_key: str, *, organization_id: int, account_id: int, channel: str) -> str:
    """A token the serializer reads back: its compact JSON payload, base64, signed with its key
    (derived once). Every dispatched message signs one, and building the serializer's signer and
    trying to compress the payload each time cost three times as much. The serializer writes the
    same token, except that it compresses a payload when that makes it shorter (long runs of the
    same digit); it reads both."""
    payload = base64_encode(json.dumps([organization_id, account_id, channel], ensure_ascii=False, separators=(",", ":")))
    return _signer(secret_key).sign(payload).decode("ascii")


def read_unsubscribe_token(secret_key: str, token: str) -> UnsubscribeTarget | None:
    """The target of a token, or None when it is forged or damaged."""
    try:
        org_id, account_id, channel = _serializer(secret_key).loads(token)
    except (BadSignature, ValueError, TypeError):
        return None
    if not isinstance(org_id, int) or not isinstance(account_id, int) or not isinstance(channel, str):
        return None
    return UnsubscribeTarget(org_id, account_id, channel)


def unsubscribe_url(public_url: str, secret_key: str, *, organization_id: int, account_id: int, channel: str) -> str:
    token = unsubscribe_token(secret_key, organization_id=organization_id, account_id=account_id, channel=channel)
    return f"{public_url.rstrip('/')}/unsubscribe/{token}"
