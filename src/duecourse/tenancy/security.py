"""Password hashing (argon2), API key generation and hashing, signed session tokens."""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

_hasher = PasswordHasher()

API_KEY_PREFIX = "dc_"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_api_key() -> str:
    """A random key; it is shown once and only its hash is stored."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # API keys carry 256 bits of entropy, so a fast hash is safe here and keeps every request cheap.
    return hashlib.sha256(key.encode()).hexdigest()


def session_serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt="duecourse-session")


def session_mark(password_hash: str, generation: int = 0) -> str:
    """A short fingerprint of the user's password hash and session generation, carried in the
    session cookie: a new password, or a logout (which counts the generation up), changes it, and
    that ends every session opened before."""
    material = password_hash if not generation else f"{password_hash}\x00{generation}"
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def new_session_token(secret_key: str, *, user_id: int, password_hash: str, generation: int) -> str:
    return session_serializer(secret_key).dumps({"uid": user_id, "pw": session_mark(password_hash, generation)})


def load_session_token(secret_key: str, token: str, max_age: int) -> tuple[int, str] | None:
    """(user id, session mark) of a valid, unexpired session token, or None."""
    try:
        data = session_serializer(secret_key).loads(token, max_age=max_age)
    except (BadSignature, SignatureExpired):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("uid"), int) or not isinstance(data.get("pw"), str):
        return None
    return data["uid"], data["pw"]
