from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from duecourse.db.base import Base, BigId
from duecourse.db.columns import pk, str_enum, utc_timestamp
from duecourse.strategies.models import Tone


class Channel(StrEnum):
    email = "email"
    sms = "sms"
    whatsapp = "whatsapp"
    voice = "voice"


class Template(Base):
    __tablename__ = "templates"
    __table_args__ = (
        UniqueConstraint("organization_id", "name", name="uq_templates_org_name"),
        UniqueConstraint("variant_of_id", "tone", name="uq_templates_variant_tone"),
    )

    id: Mapped[int] = pk()
    organization_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    channel: Mapped[Channel] = mapped_column(str_enum(Channel, "channel"), nullable=False)
    tone: Mapped[Tone] = mapped_column(str_enum(Tone, "tone"), nullable=False, default=Tone.standard)
    language: Mapped[str | None] = mapped_column(String(16))
    subject: Mapped[str | None] = mapped_column(String(500))
    body_text: Mapped[str] = mapped_column(Text, nullable=False)
    body_html: Mapped[str | None] = mapped_column(Text)
    # A tone variant of another template (SPEC §7: templates per channel and tone). A stage names the
    # base template; an item whose tone differs (e.g. empathetic after a hostile call) gets the variant.
    variant_of_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("templates.id"), index=True)
    created_at: Mapped[datetime] = utc_timestamp()
    updated_at: Mapped[datetime] = utc_timestamp()
