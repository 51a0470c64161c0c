"""Small helpers for the few places where SQLite and PostgreSQL spell things differently."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Date, Integer, func, literal_column
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement


def dialect_name(session: Session) -> str:
    return session.get_bind().dialect.name


def date_plus_days(session: Session, value: ColumnElement[Any], days: int) -> ColumnElement[Any]:
    """``value + days`` for a DATE column, as a DATE, on either dialect."""
    if dialect_name(session) == "postgresql":
        return (value + literal_column(str(int(days)), Integer)).cast(Date)
    return func.date(value, f"{int(days):+d} days", type_=Date)
