"""References to a strategy, a campaign or a user that no foreign key keeps.

Interactions name the strategy, campaign and user they came from without foreign keys (see
``engine.models.Interaction``). Deleting one of those calls :func:`forget` first, which does what
``ON DELETE SET NULL`` would have done.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import update
from sqlalchemy.orm import Session

from duecourse.engine.models import Interaction


def forget(session: Session, *, column: Literal["strategy_id", "campaign_id", "user_id"], value: int) -> None:
    """Clear the interactions' references to the strategy, campaign or user ``value`` being deleted."""
    session.execute(
        update(Interaction)
        .where(Interaction.__table__.c[column] == value)
        .values({column: None})
        .execution_options(synchronize_session=False)
    )
