"""Small column helpers shared by the domain models."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Enum, ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from duecourse.db.base import BigId, UTCDateTime


def str_enum(enum_cls: type[StrEnum], name: str) -> Enum:
    """A VARCHAR column with a CHECK constraint holding one of the enum's values (same on both dialects)."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=max(len(m.value) for m in enum_cls),
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def pk() -> Mapped[int]:
    return mapped_column(BigId, primary_key=True, autoincrement=True)


def org_fk() -> Mapped[int]:
    return mapped_column(BigId, ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False, index=True)


def tenant_of_account() -> Mapped[int]:
    """``organization_id`` of a high-volume row that belongs to an account (invoices, payments, tags,
    queue items, interactions, tasks): the account's organization, kept for tenant scoping.

    No foreign key to ``organizations``: the row's ``account_id`` references the account (ON DELETE
    CASCADE), whose own ``organization_id`` references the organization, so deleting an organization
    still deletes these rows through its accounts. The second key would be redundant, and on
    PostgreSQL every foreign key costs each inserted row a trigger call (bulk imports and enqueue
    passes write millions of rows). Writers always copy the account's organization here.
    """
    return mapped_column(BigId, nullable=False)


def utc_timestamp() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, nullable=False)
