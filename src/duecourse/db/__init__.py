"""Database: declarative base, column types, engine and sessions, dialect helpers, migrations."""

from duecourse.db.base import Base, Money, UTCDateTime
from duecourse.db.session import Database

__all__ = ["Base", "Database", "Money", "UTCDateTime"]
