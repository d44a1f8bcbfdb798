"""Errors that carry their HTTP status. Services raise them; one handler renders them all, as
body() under the native routes and in OpenAI's shape under /v1 — the message says what is wrong and
how to fix it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class AppError(Exception):
    status = 400
    code = "bad_request"
    # For an answer to send again later (429): when, as Retry-After, which clients' retries (the openai SDK's,
    # urllib3's) wait for rather than their own short backoff.
    retry_after_s: int | None = None

    def __init__(self, message: str, *, details: Any = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}  # sent with the error's answer (416's Content-Range)
        if self.retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after_s))
        if code:
            self.code = code

    def body(self) -> dict:
        """{"error": {"code", "message", "details"?}}: how the native API answers with this error."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"


class Forbidden(AppError):
    status = 403
    code = "forbidden"


class NotFound(AppError):
    """Also what another team's object answers: its existence is not for them to learn."""

    status = 404
    code = "not_found"


class Conflict(AppError):
    """The request is valid but the object's state forbids it (deleting a dataset in use, cancelling a finished job)."""

    status = 409
    code = "conflict"


class DoesNotFit(AppError):
    """A job whose estimated peak memory fits no GPU class the workers serve."""

    status = 400
    code = "does_not_fit"


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"


class UploadInterrupted(AppError):
    """The client went away before the upload's body was complete; nothing of it is kept."""

    status = 400
    code = "upload_interrupted"


class TooManyStreams(AppError):
    """A key that already holds QLORA_MAX_STREAMS_PER_KEY live streams in this process."""

    status = 429
    code = "too_many_streams"


class TooManyUploads(AppError):
    """A key that already has QLORA_MAX_UPLOADS_PER_KEY uploads in flight in this process."""

    status = 429
    code = "too_many_uploads"
    retry_after_s = 5


class TooManyDownloads(AppError):
    """A key that already has QLORA_MAX_DOWNLOADS_PER_KEY downloads streaming in this process."""

    status = 429
    code = "too_many_downloads"
    retry_after_s = 5


class QuotaExceeded(AppError):
    """Over one of the team's quotas (app/quotas/): the message names the limit, the team's use, and
    what frees it; details carry them as fields."""

    status = 429
    code = "quota_exceeded"


class RangeNotSatisfiable(AppError):
    """A Range no byte of the object falls in (it starts at or past the end); the answer's
    Content-Range says the object's size, as RFC 9110 asks."""

    status = 416
    code = "range_not_satisfiable"


class InsufficientStorage(AppError):
    """The server's disk refused a write (full, or over a filesystem quota): nothing of the request was
    kept, and the same request succeeds once an operator has freed space (RFC 4918's 507)."""

    status = 507
    code = "insufficient_storage"


class StorageUnavailable(AppError):
    """Object storage could not be reached for now (S3 down, refusing, or slow past boto's retries); the
    request's writes were aborted and rolled back, so it may be sent again."""

    status = 503
    code = "storage_unavailable"


class DatabaseUnavailable(AppError):
    """The database could not serve the request for now (its disk full, a restart, a dropped connection,
    a lock held too long); the request's transaction was rolled back, so it may be sent again."""

    status = 503
    code = "database_unavailable"


class Invalid(AppError):
    """A request whose content is wrong; details name each field and its allowed values."""

    status = 422
    code = "invalid"


def field_errors(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"field": field, "message": message} for field, message in pairs]


class ErrorDetail(BaseModel):
    code: str | None = None
    message: str
    details: Any = None  # native API: [{"field", "message"}] naming each bad field
    type: str | None = None  # /v1: OpenAI's error type and the parameter at fault
    param: str | None = None


class ErrorBody(BaseModel):
    """Every error answer, native or /v1: {"error": {...}}."""

    error: ErrorDetail


# Documented on every operation, so generated clients know the error shape: these are the answers any
# route can give (a bad key, another team's object, a state that forbids it, a bad field, a busy key).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in {
        400: "The request cannot be served as sent (see the message).",
        401: "No API key, or a revoked one.",
        403: "The key may not do this (an admin key is needed).",
        404: "No such object, or one of another team.",
        409: "The object's state forbids this.",
        422: "A field is invalid; details name each field and its allowed values.",
        429: "Too many of something at once for this key, or over the team's quota (code quota_exceeded).",
    }.items()}
