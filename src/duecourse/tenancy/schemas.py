from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

from duecourse.tenancy.models import Role
from duecourse.validation import currency_code, timezone_name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(Strict):
    email: EmailStr
    password: str


class UserIn(Strict):
    email: EmailStr
    name: str = Field(default="", max_length=200)
    password: str = Field(min_length=8, max_length=200)
    role: Role


class UserPatch(Strict):
    name: str | None = Field(default=None, max_length=200)
    role: Role | None = None
    active: bool | None = None
    password: str | None = Field(default=None, min_length=8, max_length=200)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    email: str
    name: str
    role: Role
    active: bool
    created_at: datetime
    last_login_at: datetime | None


class ApiKeyIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    role: Role


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The API key. It is shown only this once; store it now.")


class OrganizationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    timezone: str
    base_currency: str


class OrganizationPatch(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = None
    base_currency: str | None = None

    _tz = field_validator("timezone")(lambda v: None if v is None else timezone_name(v))
    _cur = field_validator("base_currency")(lambda v: None if v is None else currency_code(v))


class MeOut(BaseModel):
    organization: OrganizationOut
    role: Role
    actor: str
    user_id: int | None
    permissions: list[str]


class AuditEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: datetime
    entity_type: str
    entity_id: int | None
    action: str
    field: str | None
    old_value: str | None
    new_value: str | None
    description: str
    actor: str
    user_id: int | None
    api_key_id: int | None
