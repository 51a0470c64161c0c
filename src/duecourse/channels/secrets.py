"""Provider credentials encrypted at rest (SPEC §7, issue: secrets are never stored in clear).

Fernet (AES-128-CBC + HMAC-SHA256) from ``cryptography``. The key is ``DUECOURSE_ENCRYPTION_KEY``
when set (a Fernet key is used as is; any other text is stretched into one), else derived from
``DUECOURSE_SECRET_KEY``. A value encrypted under another key does not decrypt: the error says so
and the credentials must be entered again.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from duecourse.errors import DomainError


class SecretsUnreadable(DomainError):
    pass


@lru_cache(maxsize=8)
def _fernet(key_material: str) -> Fernet:
    if not key_material:  # never derive a key from empty text: anyone could
        from duecourse.config import SecretKeyError

        raise SecretKeyError(
            "No key to encrypt provider credentials with: set DUECOURSE_SECRET_KEY (or DUECOURSE_ENCRYPTION_KEY)"
        )
    try:
        return Fernet(key_material.encode())
    except ValueError:
        digest = hashlib.sha256(b"duecourse-secrets\x00" + key_material.encode()).digest()
        return Fernet(base64.urlsafe_b64encode(digest))


def key_from_settings(settings: Any) -> str:
    return settings.encryption_key or settings.secret_key


def encrypt(key: str, values: dict[str, str]) -> str:
    return _fernet(key).encrypt(json.dumps(values, sort_keys=True).encode()).decode()


def decrypt(key: str, token: str | None) -> dict[str, str]:
    if not token:
        return {}
    try:
        return json.loads(_fernet(key).decrypt(token.encode()))
    except InvalidToken:
        raise SecretsUnreadable(
            "Stored provider credentials cannot be decrypted with the current encryption key; enter them again"
        ) from None


def mask(value: str | None) -> str | None:
    """What the API and UI show of a secret: never more than its last 4 characters."""
    if not value:
        return None
    return "••••" + value[-4:] if len(value) >= 12 else "••••"
