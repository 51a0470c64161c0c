"""Domain errors and the one error format of the API.

Every error answers ``{"error": {"code": ..., "message": ..., "fields": [{"field": ..., "message": ...}]}}``.
Services raise these; the routes never build error responses by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldError:
    field: str
    message: str


@dataclass
class DomainError(Exception):
    message: str
    fields: list[FieldError] = field(default_factory=list)
    status_code: int = 400
    code: str = "bad_request"

    def __str__(self) -> str:
        if self.fields:
            return self.message + ": " + "; ".join(f"{f.field}: {f.message}" for f in self.fields)
        return self.message

    def as_dict(self) -> dict[str, object]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "fields": [{"field": f.field, "message": f.message} for f in self.fields],
            }
        }


class ValidationFailed(DomainError):
    def __init__(self, message: str = "Validation failed", fields: list[FieldError] | None = None) -> None:
        super().__init__(message, fields or [], 422, "validation_error")

    @classmethod
    def on(cls, field_name: str, message: str) -> ValidationFailed:
        return cls(f"{field_name}: {message}", [FieldError(field_name, message)])


class NotFound(DomainError):
    def __init__(self, what: str = "Object") -> None:
        super().__init__(f"{what} not found", [], 404, "not_found")


class Conflict(DomainError):
    def __init__(self, message: str, fields: list[FieldError] | None = None) -> None:
        super().__init__(message, fields or [], 409, "conflict")


class Unauthorized(DomainError):
    def __init__(self, message: str = "Authentication required") -> None:
        super().__init__(message, [], 401, "unauthorized")


class Forbidden(DomainError):
    def __init__(self, message: str = "Your role does not allow this action") -> None:
        super().__init__(message, [], 403, "forbidden")
