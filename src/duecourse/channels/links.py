"""Links placed in messages (SPEC §7): the signed unsubscribe link of every message.

The token names the organization, the account and the channel and is signed with the process's
secret key, so nobody can unsubscribe an account they were not sent. Unsubscribe links never
expire: a debtor who opts out from an old message must still be heard.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from itsdangerous import BadSignature, Signer, URLSafeSerializer

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
    """The serializer's own token (its payload, signed with the same key), without building a signer
    and deriving its key for every message: every dispatched message signs one."""
    payload = _serializer(secret_key).dump_payload([organization_id, account_id, channel])
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
