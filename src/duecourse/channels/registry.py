"""Which provider sends each organization's messages on each channel (SPEC §7).

:class:`Providers` is what the engine's dispatch is given: it reads the organization's channel
configuration and builds the adapter (SMTP, Twilio-compatible, HTTP voice agent), or the sandbox
when the channel is not configured. Adapters never touch the database; they get their settings,
their decrypted secrets and a :class:`ProviderEnv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from importlib import import_module

from sqlalchemy.orm import Session

from duecourse.channels import config as channel_config
from duecourse.channels.base import Provider
from duecourse.channels.links import unsubscribe_url
from duecourse.channels.sandbox import SandboxProvider
from duecourse.channels.secrets import key_from_settings
from duecourse.config import SecretKeyError, Settings, get_settings

# provider name -> "module:Class"; each adapter module is imported only when an organization uses it.
ADAPTERS = {
    "smtp": "duecourse.channels.smtp:SmtpProvider",
    "twilio": "duecourse.channels.twilio:TwilioProvider",
    "voice_http": "duecourse.channels.voice:VoiceProvider",
}


@dataclass(frozen=True)
class ProviderEnv:
    """What an adapter may know about its surroundings."""

    organization_id: int
    channel: str
    public_url: str
    timeout_seconds: float

    def callback_url(self, path: str) -> str:
        """The absolute URL of one of this organization's inbound webhooks, e.g. ``twilio/status``."""
        return f"{self.public_url.rstrip('/')}/api/v1/webhooks/{self.organization_id}/{path.lstrip('/')}"


class Providers:
    """The provider for (organization, channel), and the per-message links the templates use."""

    def __init__(self, settings: Settings | None = None, *, sandbox_only: bool = False) -> None:
        self.settings = settings or get_settings()
        self.sandbox_only = sandbox_only
        self.key = key_from_settings(self.settings)

    def provider(self, session: Session, now: datetime, organization_id: int, channel: str) -> Provider:
        if self.sandbox_only:
            return SandboxProvider(session, now)
        config = channel_config.get_config(session, organization_id=organization_id, channel=channel)
        if config is None or config.provider == "sandbox":
            return SandboxProvider(session, now)
        module, _, cls = ADAPTERS[config.provider].partition(":")
        adapter = getattr(import_module(module), cls)
        env = ProviderEnv(organization_id, channel, self.settings.public_url, self.settings.provider_timeout_seconds)
        return adapter(dict(config.settings), channel_config.read_secrets(config, self.key), env)

    def unsubscribe_link(self, *, organization_id: int, account_id: int, channel: str) -> str:
        if not self.settings.secret_key:
            # Never sign with an empty key (anyone could forge the link). The CLI and the app fill
            # in or require the key; code that runs the engine directly must set it too.
            raise SecretKeyError(
                "No key to sign unsubscribe links with: set DUECOURSE_SECRET_KEY (the same in every process), "
                "or give the engine settings that have one"
            )
        return unsubscribe_url(
            self.settings.public_url, self.settings.secret_key,
            organization_id=organization_id, account_id=account_id, channel=channel,
        )

    # The engine calls the factory as a function: providers(session, now, org_id, channel).
    __call__ = provider
