"""The Sandbox outbox (SPEC §7): what the sandbox provider would have sent, newest first, and one message."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import select

from duecourse.channels.config import MESSAGING_CHANNELS
from duecourse.channels.models import SandboxMessage
from duecourse.errors import NotFound
from duecourse.ledger.models import Account
from duecourse.pagination import PageParams, paginate
from duecourse.web.core import PageRoute, Web, WebPage, query_url

router = APIRouter(route_class=PageRoute)
PAGE_SIZE = 25


def _account_names(web: Web, ids: set[int]) -> dict[int, tuple[str, str]]:
    if not ids:
        return {}
    rows = web.session.execute(
        select(Account.id, Account.name, Account.external_id).where(
            Account.organization_id == web.principal.organization_id, Account.id.in_(ids)
        )
    ).all()
    return {r[0]: (r[1], r[2]) for r in rows}


@router.get("/outbox")
def outbox_page(
    web: WebPage,
    channel: str | None = Query(None),
    account: str | None = Query(None),
    cursor: str | None = Query(None),
) -> Response:
    channel_filter = channel if channel in MESSAGING_CHANNELS else None
    account_id = int(account) if account and account.isdigit() else None
    stmt = select(SandboxMessage).where(SandboxMessage.organization_id == web.principal.organization_id)
    if channel_filter:
        stmt = stmt.where(SandboxMessage.channel == channel_filter)
    if account_id is not None:
        stmt = stmt.where(SandboxMessage.account_id == account_id)
    page = paginate(web.session, stmt, SandboxMessage.id, PageParams(limit=PAGE_SIZE, cursor=cursor), lambda m: m,
                    descending=True)
    messages: list[SandboxMessage] = page["items"]
    ctx: dict[str, Any] = {
        "messages": messages,
        "accounts": _account_names(web, {m.account_id for m in messages}),
        "channels": MESSAGING_CHANNELS,
        "channel": channel_filter or "",
        "account": account_id or "",
        "next_url": query_url("/outbox", channel=channel_filter, account=account_id, cursor=page["next_cursor"])
        if page["next_cursor"] else None,
        "first_url": query_url("/outbox", channel=channel_filter, account=account_id) if cursor else None,
    }
    return web.render("outbox/list.html", active="outbox", **ctx)


@router.get("/outbox/{message_id}")
def outbox_message(message_id: int, web: WebPage) -> Response:
    message = web.session.scalar(
        select(SandboxMessage).where(
            SandboxMessage.organization_id == web.principal.organization_id, SandboxMessage.id == message_id
        )
    )
    if message is None:
        raise NotFound("Message")
    names = _account_names(web, {message.account_id})
    return web.render("outbox/detail.html", active="outbox", message=message, account=names.get(message.account_id))
