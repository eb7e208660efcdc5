"""RFC 9457 problem JSON for every answer of the HTTP job API that is not a success, and the gate
that turns away a request without a key (or with too large a body) before its body is read."""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pagecast.errors import (
    IdempotencyConflict,
    InvalidInput,
    JobNotFound,
    JobStateConflict,
    PagecastError,
)

PROBLEM = "application/problem+json"
_STATUS_OF = {InvalidInput: 422, JobNotFound: 404, JobStateConflict: 409, IdempotencyConflict: 409}
_LIMITS = ("le", "ge", "lt", "gt", "max_length", "min_length")


class Problem(Exception):
    """An answer other than success."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail} | extra
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    plain = json.loads(json.dumps(body, default=str))  # a limit may be a time
    return JSONResponse(plain, status_code=status, media_type=PROBLEM, headers=headers)


def _field(error: dict[str, Any]) -> str:
    if error["type"] == "json_invalid":
        return "body"
    location = [str(part) for part in error["loc"]]
    return ".".join(
        location[1:] if location[0] in ("body", "query", "path", "header") else location
    )


def install(api: FastAPI) -> None:
    """Answer every error of ``api`` as problem JSON."""

    @api.exception_handler(Problem)
    async def known(_: Request, error: Problem) -> JSONResponse:
        return problem(error.status, error.title, error.detail, **error.extra)

    @api.exception_handler(PagecastError)
    async def refused(_: Request, error: PagecastError) -> JSONResponse:
        status = next((s for kind, s in _STATUS_OF.items() if isinstance(error, kind)), 500)
        extra = {"field": getattr(error, "field", None), "limit": getattr(error, "limit", None)}
        extra = {k: v for k, v in extra.items() if v is not None}
        return problem(status, type(error).__name__, str(error), **extra)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": _field(e),
                "detail": e["msg"],
                "limit": next((e["ctx"][k] for k in _LIMITS if k in e.get("ctx", {})), None),
            }
            for e in error.errors()
        ]
        first = errors[0]
        extra = {"field": first["field"], "errors": errors}
        if first["limit"] is not None:
            extra["limit"] = first["limit"]
        return problem(422, "InvalidField", f"{first['field']}: {first['detail']}", **extra)

    @api.exception_handler(HTTPException)
    async def routing(_: Request, error: HTTPException) -> JSONResponse:
        return problem(error.status_code, "HTTPError", str(error.detail))

    @api.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        return problem(500, "InternalError", "the server failed; nothing more is said here")


class Gate:
    """Turns away, before the body is read, a request without a ``Bearer`` key (401) and a body
    over ``max_body`` bytes (413); the schema and CORS preflights pass."""

    def __init__(self, app: ASGIApp, *, max_body: int, open_paths: tuple[str, ...]) -> None:
        self.app, self.max_body, self.open_paths = app, max_body, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        if scope["path"].endswith(self.open_paths):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not headers.get(b"authorization", b"").lower().startswith(b"bearer "):
            detail = "a valid Authorization: Bearer <key> is required"
            return await problem(401, "Unauthorized", detail)(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        chunked = b"transfer-encoding" in headers  # no length to check: refused
        if chunked or not length.isdigit() or int(length) > self.max_body:
            detail = f"the body is over {self.max_body} bytes (or its length is not given)"
            return await problem(413, "TooLarge", detail, limit=self.max_body)(scope, receive, send)
        return await self.app(scope, receive, send)
