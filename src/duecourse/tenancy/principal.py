"""Who is calling, and what their role allows (SPEC §1)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from duecourse.errors import Forbidden
from duecourse.tenancy.models import Role


class Permission(StrEnum):
    read = "read"
    manage_strategies = "manage_strategies"
    manage_templates = "manage_templates"
    manage_settings = "manage_settings"
    manage_users = "manage_users"
    manage_campaigns = "manage_campaigns"
    manage_accounts = "manage_accounts"
    import_data = "import_data"
    operate_engine = "operate_engine"
    work_tasks = "work_tasks"
    record_payments = "record_payments"
    manual_send = "manual_send"


_MANAGER = {
    Permission.read,
    Permission.manage_campaigns,
    Permission.manage_accounts,
    Permission.import_data,
    Permission.operate_engine,
    Permission.work_tasks,
    Permission.record_payments,
    Permission.manual_send,
}
_AGENT = {Permission.read, Permission.work_tasks, Permission.record_payments, Permission.manual_send}

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.admin: frozenset(Permission),
    Role.manager: frozenset(_MANAGER),
    Role.agent: frozenset(_AGENT),
    Role.viewer: frozenset({Permission.read}),
}


@dataclass(frozen=True)
class Principal:
    organization_id: int
    role: Role
    actor: str
    user_id: int | None = None
    api_key_id: int | None = None

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def require(self, permission: Permission) -> None:
        if not self.can(permission):
            raise Forbidden(f"The {self.role.value} role cannot {permission.value.replace('_', ' ')}")

    @classmethod
    def system(cls, organization_id: int) -> Principal:
        return cls(organization_id=organization_id, role=Role.admin, actor="system")
