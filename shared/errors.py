"""One base error with an HTTP status, rendered by one handler as a JSON body."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.events import one_error_per_attribute
from shared.logs import get_logger

log = get_logger(__name__)


class RetainError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code


class BadRequestError(RetainError):
    status_code = 400
    code = "bad_request"


class UnauthorizedError(RetainError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(RetainError):
    status_code = 403
    code = "forbidden"


class NotFoundError(RetainError):
    status_code = 404
    code = "not_found"


class ConflictError(RetainError):
    status_code = 409
    code = "conflict"


class PreconditionFailedError(RetainError):
    status_code = 412
    code = "precondition_failed"


class PayloadTooLargeError(RetainError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(RetainError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInputError(RetainError):
    status_code = 422
    code = "invalid"


class RateLimitedError(RetainError):
    status_code = 429
    code = "rate_limited"


class UnavailableError(RetainError):
    status_code = 503
    code = "unavailable"


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """What every 4xx and 5xx of every service answers (see :func:`install_error_handlers`)."""

    error: ErrorBody


# The same code for the same status, whether a RetainError or the framework raised it.
_CODE_OF_STATUS = {
    cls.status_code: cls.code
    for cls in (
        BadRequestError,
        UnauthorizedError,
        ForbiddenError,
        NotFoundError,
        PreconditionFailedError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        InvalidInputError,
        RateLimitedError,
        UnavailableError,
    )
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details is not None:
        body["error"]["details"] = details
    return body


def pydantic_errors(errors: Any, *, drop_prefix: int = 0) -> list[dict[str, Any]]:
    """Pydantic's error list as ``{field, message}`` pairs with a dotted field path."""
    out: list[dict[str, Any]] = []
    for err in one_error_per_attribute(list(errors)):
        loc = [str(p) for p in err.get("loc", ())][drop_prefix:]
        out.append({"field": ".".join(loc) or "(body)", "message": err.get("msg", "invalid")})
    return out


def install_error_handlers(app: FastAPI) -> None:
    async def on_retain_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RetainError)  # noqa: S101 - registered for RetainError only
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        errors = exc.errors()
        if errors and all(e.get("type") == "json_invalid" for e in errors):
            # A body that is not JSON at all: 400, as ingest answers it and the OpenAPI says,
            # not a 422 about a field.
            why = "; ".join(str((e.get("ctx") or {}).get("error") or e.get("msg")) for e in errors)
            return JSONResponse(
                error_body("bad_request", f"the body is not valid JSON: {why}"), status_code=400
            )
        return JSONResponse(
            error_body("invalid", "the request is not valid", pydantic_errors(errors)),
            status_code=422,
        )

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        return JSONResponse(
            error_body(_CODE_OF_STATUS.get(exc.status_code, f"http_{exc.status_code}"), str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's outermost middleware calls this and then raises the error on to the
        # server, which logs its traceback; the line here is the one in the service's own log.
        log.error("unexpected error", method=request.method, path=request.url.path, error=type(exc).__name__)
        return JSONResponse(
            error_body("internal", "an unexpected error; it has been logged"), status_code=500
        )

    app.add_exception_handler(RetainError, on_retain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
