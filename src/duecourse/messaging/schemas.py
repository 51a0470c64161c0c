"""API shapes of message templates and their preview (SPEC §7)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from duecourse.messaging.models import Channel
from duecourse.strategies.models import Tone

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
MAX_BODY = 100_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemplateIn(Strict):
    """A whole template: the body of POST and PUT. Subject and HTML body are for email only."""

    name: Name
    channel: Channel
    tone: Tone = Tone.standard
    language: str | None = Field(default=None, max_length=16)
    subject: str | None = Field(default=None, max_length=500)
    body_text: str = Field(max_length=MAX_BODY)
    body_html: str | None = Field(default=None, max_length=MAX_BODY)
    variant_of_id: int | None = Field(
        default=None,
        description="Make this the tone variant of another template (same channel, another tone): a stage "
        "that uses that template sends this one to accounts whose next message has this tone",
    )


class TemplatePatch(Strict):
    name: Name | None = None
    channel: Channel | None = None
    tone: Tone | None = None
    language: str | None = Field(default=None, max_length=16)
    subject: str | None = Field(default=None, max_length=500)
    body_text: str | None = Field(default=None, max_length=MAX_BODY)
    body_html: str | None = Field(default=None, max_length=MAX_BODY)
    variant_of_id: int | None = None


class TemplateOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    channel: Channel
    tone: Tone
    language: str | None
    subject: str | None
    body_text: str
    body_html: str | None
    variant_of_id: int | None
    created_at: datetime
    updated_at: datetime


class TemplatePage(BaseModel):
    items: list[TemplateOut]
    next_cursor: str | None = None


class PreviewIn(Strict):
    account_id: Annotated[int, Field(strict=True)] | None = Field(
        default=None, description="Render for this account; sample values when omitted"
    )


class SmsInfo(BaseModel):
    encoding: str
    characters: int
    units: int = Field(description="septets (GSM-7) or UTF-16 code units (UCS-2)")
    segments: int


class PreviewOut(BaseModel):
    channel: Channel
    account_id: int | None
    subject: str | None
    text: str
    html: str | None
    sms: SmsInfo | None = None
    warnings: list[str] = Field(default_factory=list)


class VariablesOut(BaseModel):
    variables: list[str]
    sample: dict[str, object]
