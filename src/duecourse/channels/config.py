"""Per-organization channel configuration (SPEC §7): which provider each channel uses, its
settings, and its credentials (encrypted at rest, never returned in full).

Every provider declares its settings and its secret fields here, so the API, the UI and the
adapters agree on one shape. A channel without a row uses the sandbox.
"""

from __future__ import annotations

import secrets as pysecrets
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from duecourse.channels import secrets as crypto
from duecourse.channels.models import ChannelConfig
from duecourse.errors import FieldError, ValidationFailed
from duecourse.validation import phone_e164

MESSAGING_CHANNELS = ("email", "sms", "whatsapp", "voice")
INBOUND = "inbound"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class SmtpSettings(_Strict):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = Field(default=None, max_length=255)
    from_address: EmailStr
    from_name: str | None = Field(default=None, max_length=200)
    reply_to: EmailStr | None = None


class TwilioSettings(_Strict):
    base_url: str = Field(default="https://api.twilio.com", pattern=r"^https?://[^\s/]+(:\d+)?(/[^\s]*)?$")
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    from_number: str | None = None
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")

    @field_validator("from_number")
    @classmethod
    def _e164(cls, v: str | None) -> str | None:
        return phone_e164(v) if v else v


class VoiceSettings(_Strict):
    endpoint_url: str = Field(pattern=r"^https?://[^\s/]+(:\d+)?(/[^\s]*)?$", max_length=500)
    agent_id: str | None = Field(default=None, max_length=200)
    caller_id: str | None = None

    @field_validator("caller_id")
    @classmethod
    def _e164(cls, v: str | None) -> str | None:
        return phone_e164(v) if v else v


class _NoSettings(_Strict):
    pass


# provider -> (settings model, secret fields, required secret fields)
PROVIDERS: dict[str, tuple[type[BaseModel], tuple[str, ...], tuple[str, ...]]] = {
    "sandbox": (_NoSettings, (), ()),
    "smtp": (SmtpSettings, ("password",), ()),
    "twilio": (TwilioSettings, ("auth_token",), ("auth_token",)),
    "voice_http": (VoiceSettings, ("api_key", "webhook_secret"), ()),
}
CHANNEL_PROVIDERS: dict[str, tuple[str, ...]] = {
    "email": ("sandbox", "smtp"),
    "sms": ("sandbox", "twilio"),
    "whatsapp": ("sandbox", "twilio"),
    "voice": ("sandbox", "voice_http"),
}
# Secrets the system generates itself when a provider is chosen (shown in the response once).
GENERATED_SECRETS = {"voice_http": ("webhook_secret",)}
# Where a provider's credentials are sent. When one of these changes, the stored credentials are
# not carried over: they must be given again with it, or an admin (or a leaked admin key) could
# point the channel at a server of theirs and collect the provider's password on the next send.
DESTINATION_SETTINGS = ("host", "base_url", "endpoint_url")


def _check_channel(channel: str) -> None:
    if channel not in CHANNEL_PROVIDERS:
        raise ValidationFailed.on("channel", f"unknown channel {channel!r}; one of: {', '.join(CHANNEL_PROVIDERS)}")


def get_config(session: Session, *, organization_id: int, channel: str) -> ChannelConfig | None:
    return session.scalar(
        select(ChannelConfig).where(ChannelConfig.organization_id == organization_id, ChannelConfig.channel == channel)
    )


def read_secrets(config: ChannelConfig | None, key: str) -> dict[str, str]:
    return crypto.decrypt(key, config.secrets_encrypted) if config is not None else {}


def describe(config: ChannelConfig | None, channel: str, key: str) -> dict[str, Any]:
    """What the API shows: provider, settings, and each secret masked."""
    if config is None:
        return {"channel": channel, "provider": "sandbox", "settings": {}, "secrets": {}, "updated_at": None}
    stored = read_secrets(config, key)
    names = PROVIDERS[config.provider][1]
    return {
        "channel": channel,
        "provider": config.provider,
        "settings": dict(config.settings),
        "secrets": {name: crypto.mask(stored.get(name)) for name in names},
        "updated_at": config.updated_at,
    }


def put_config(
    session: Session, *, organization_id: int, channel: str, provider: str, settings: dict[str, Any],
    secrets: dict[str, str | None], key: str, now: datetime,
) -> tuple[ChannelConfig, dict[str, str]]:
    """Store a channel's provider, settings and secrets. A secret left out keeps its stored value;
    a secret given as empty or null is removed. Returns the row and any secret generated now."""
    _check_channel(channel)
    if provider not in CHANNEL_PROVIDERS[channel]:
        raise ValidationFailed.on(
            "provider", f"{channel} can use: {', '.join(CHANNEL_PROVIDERS[channel])} (got {provider!r})"
        )
    model, secret_names, required = PROVIDERS[provider]
    try:
        clean = model.model_validate(settings or {}).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        raise ValidationFailed(
            "Invalid channel settings",
            [FieldError("settings." + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()],
        ) from None
    unknown = sorted(set(secrets or {}) - set(secret_names))
    if unknown:
        allowed = ", ".join(secret_names) or "none"
        raise ValidationFailed("Unknown secrets", [FieldError(f"secrets.{n}", f"not a secret of {provider} (allowed: {allowed})") for n in unknown])
    config = get_config(session, organization_id=organization_id, channel=channel)
    stored = read_secrets(config, key) if config is not None and config.provider == provider else {}
    moved = config is not None and any(
        (config.settings or {}).get(name) != clean.get(name) for name in DESTINATION_SETTINGS if name in clean)
    if moved:
        carried = [n for n in secret_names if n in stored and n not in GENERATED_SECRETS.get(provider, ()) and n not in (secrets or {})]
        if carried:
            raise ValidationFailed(
                "Credentials must be given again when the provider's address changes",
                [FieldError(f"secrets.{n}", "give it again: the address it is sent to changed") for n in carried],
            )
    for name, value in (secrets or {}).items():
        if value:
            stored[name] = value
        else:
            stored.pop(name, None)
    generated: dict[str, str] = {}
    for name in GENERATED_SECRETS.get(provider, ()):
        if name not in stored:
            stored[name] = generated[name] = "whsec_" + pysecrets.token_urlsafe(32)
    missing = [n for n in required if not stored.get(n)]
    if missing:
        raise ValidationFailed("Missing secrets", [FieldError(f"secrets.{n}", "required") for n in missing])
    if config is None:
        config = ChannelConfig(organization_id=organization_id, channel=channel, created_at=now)
        session.add(config)
    config.provider = provider
    config.settings = clean
    config.secrets_encrypted = crypto.encrypt(key, stored) if stored else None
    config.updated_at = now
    session.flush()
    return config, generated


def inbound_secret(session: Session, *, organization_id: int, key: str, now: datetime) -> str:
    """The signing secret of the organization's own inbound webhooks, created on first use."""
    config = get_config(session, organization_id=organization_id, channel=INBOUND)
    if config is not None:
        value = read_secrets(config, key).get("signing_secret")
        if value:
            return value
    return rotate_inbound_secret(session, organization_id=organization_id, key=key, now=now)


def rotate_inbound_secret(session: Session, *, organization_id: int, key: str, now: datetime) -> str:
    value = "whsec_" + pysecrets.token_urlsafe(32)
    config = get_config(session, organization_id=organization_id, channel=INBOUND)
    if config is None:
        config = ChannelConfig(organization_id=organization_id, channel=INBOUND, provider="signing", settings={}, created_at=now)
        session.add(config)
    config.secrets_encrypted = crypto.encrypt(key, {"signing_secret": value})
    config.updated_at = now
    session.flush()
    return value
