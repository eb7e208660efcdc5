"""The HTTP job API, mounted at ``/v1`` by ``pagecast serve``: create a job, read it, list jobs,
act on one, and follow its progress (``GET /v1/jobs/{id}/events``, ``pagecast.progress``).

Every request carries ``Authorization: Bearer <key>`` (``pagecast api-key create``); a key limited
to pages sees only their jobs (another page's job is 404). Errors are RFC 9457 problem JSON that
name the field and the limit, from the same checks as the CLI; the schema is at
``/v1/openapi.json``. A created job starts through the ``send-job`` deployment when a Prefect API
with a worker is there, else it waits for the sweep.
"""

import base64
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from pagecast import apikeys, commands, dispatch, lifecycle, repo, trigger
from pagecast.content import MAX_BUTTONS, MAX_QUICK_REPLIES, MAX_URL
from pagecast.db import session_scope
from pagecast.errors import (
    IdempotencyConflict,
    InvalidField,
    InvalidInput,
    JobNotFound,
    JobStateConflict,
    PagecastError,
)
from pagecast.forms import URL_PATTERN, ButtonField, QuickReplyField, broadcast_request
from pagecast.models import MAX_TEXT_LENGTH, ApiKey, JobStatus, MessageTag, MessagingType
from pagecast.preview import preview_job
from pagecast.progress import events_endpoint
from pagecast.settings import Settings
from pagecast.validation import MAX_CONCURRENCY, MAX_RATE_PER_SECOND, validate_scheduled_at
from pagecast.views import FailedAttempts, job_view

PROBLEM = "application/problem+json"
_MAX_PAGE = 100
_STATUS_OF = {
    InvalidInput: 422,
    JobNotFound: 404,
    JobStateConflict: 409,
    IdempotencyConflict: 409,
}


class Problem(Exception):
    """An answer other than success, as problem JSON."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail} | extra
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    plain = json.loads(json.dumps(body, default=str))  # limits may be times, contexts errors
    return JSONResponse(plain, status_code=status, media_type=PROBLEM, headers=headers)


class JobCreate(BaseModel):
    """A broadcast: the page, the message, the audience (PSIDs or contact tags) and the pace."""

    page_id: Annotated[str, Field(pattern=r"^[0-9]{1,32}$")]
    text: Annotated[str | None, Field(max_length=MAX_TEXT_LENGTH)] = None
    psids: list[str] = []
    contact_tags: list[str] = []
    match_all_tags: bool = False
    messaging_type: MessagingType = MessagingType.UPDATE
    tag: MessageTag | None = None
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 50
    rate_per_second: Annotated[float, Field(gt=0, le=MAX_RATE_PER_SECOND)] = 20.0
    allow_high_volume: bool = False
    scheduled_at: str | None = None
    resend_unknown: bool = False
    dry_run: bool = False
    image_url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    video_url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    file_url: Annotated[str | None, Field(pattern=URL_PATTERN, max_length=MAX_URL)] = None
    quick_replies: Annotated[list[QuickReplyField], Field(max_length=MAX_QUICK_REPLIES)] = []
    buttons: Annotated[list[ButtonField], Field(max_length=MAX_BUTTONS)] = []


def _cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def _after(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not cursor:
        return None
    try:
        moment, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(moment), uuid.UUID(job_id)
    except ValueError:
        raise InvalidField("cursor", "is not a cursor this API gave") from None


def _start(settings: Settings, job_id: uuid.UUID) -> dict[str, Any]:
    """Start the job on the Prefect server when it can run it now; else say the sweep will."""
    target = dispatch.choose_target(settings)
    if target.api_url is None:
        return {"started": False, "reason": f"{target.reason}; the sweep starts it"}
    run = trigger.submit(
        target.api_url,
        flow_name=dispatch.SEND_JOB[0],
        deployment_name=dispatch.SEND_JOB[1],
        parameters={"job_id": str(job_id)},
        idempotency_key=f"api-{job_id}",
    )
    return {"started": True, "flow_run_id": str(run.flow_run_id), "ui_url": run.ui_url}


def create_api(settings: Settings, engine: sa.Engine) -> FastAPI:
    """The ``/v1`` application."""
    api = FastAPI(title="pagecast job API", version="1", openapi_url="/openapi.json")
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        )
    attempts = FailedAttempts()
    recovery = lifecycle.Recovery.from_settings(settings)

    @api.exception_handler(Problem)
    async def problem(_: Request, error: Problem) -> JSONResponse:
        return _problem(error.status, error.title, error.detail, **error.extra)

    @api.exception_handler(PagecastError)
    async def pagecast_error(_: Request, error: PagecastError) -> JSONResponse:
        status = next((s for kind, s in _STATUS_OF.items() if isinstance(error, kind)), 500)
        extra = {"field": getattr(error, "field", None), "limit": getattr(error, "limit", None)}
        extra = {k: v for k, v in extra.items() if v is not None}
        return _problem(status, type(error).__name__, str(error), **extra)

    @api.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(part) for part in e["loc"] if part != "body"),
                "detail": e["msg"],
                "limit": next(iter((e.get("ctx") or {}).values()), None),
            }
            for e in error.errors()
        ]
        first = errors[0]
        detail = f"{first['field']}: {first['detail']}"
        return _problem(422, "InvalidField", detail, field=first["field"], errors=errors)

    def key(request: Request, authorization: Annotated[str, Header()] = "") -> ApiKey:
        client = request.client.host if request.client else "?"
        if attempts.blocked(client):
            raise Problem(429, "Too many failed attempts", "wait a minute before trying again")
        scheme, _, presented = authorization.partition(" ")
        with session_scope(engine) as session:
            found = apikeys.authenticate(session, presented.strip()) if scheme == "Bearer" else None
        if found is None:
            attempts.failed(client)
            raise Problem(401, "Unauthorized", "a valid Authorization: Bearer <key> is required")
        return found

    Key = Annotated[ApiKey, Depends(key)]

    def job_of(api_key: ApiKey, job_id: uuid.UUID) -> dict[str, Any]:
        with session_scope(engine) as session:
            apikeys.visible_job(session, api_key, job_id)
            return job_view(repo.job_progress(session, job_id=job_id))

    @api.post("/jobs", status_code=201)
    def create_job(
        body: JobCreate,
        api_key: Key,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        if not apikeys.may_see(api_key, body.page_id):
            raise InvalidField("page_id", f"this API key may not send for page {body.page_id}")
        request = broadcast_request(
            **body.model_dump(
                include={"page_id", "text", "contact_tags", "match_all_tags", "concurrency"}
                | {"rate_per_second", "allow_high_volume", "resend_unknown", "tag"}
                | {"image_url", "video_url", "file_url"}
            ),
            psids="\n".join(body.psids),
            messaging_type=body.messaging_type.value,
            quick_replies=body.quick_replies,
            buttons=body.buttons,
            idempotency_key=idempotency_key,
            skip_invalid=body.dry_run,
            scheduled_at=validate_scheduled_at(body.scheduled_at, now=datetime.now().astimezone()),
        )
        if body.dry_run:
            return JSONResponse(preview_job(engine, request=request).as_dict() | {"dry_run": True})
        with session_scope(engine) as session:
            created = repo.create_job(session, request=request)
        started = _start(settings, created.job.id) if created.created else {}
        view = job_of(api_key, created.job.id) | {"created": created.created} | started
        return JSONResponse(view, status_code=201 if created.created else 200)

    @api.get("/jobs/{job_id}")
    def get_job(job_id: uuid.UUID, api_key: Key) -> dict[str, Any]:
        return job_of(api_key, job_id)

    @api.get("/jobs")
    def list_jobs(
        api_key: Key,
        status: JobStatus | None = None,
        page_id: str | None = None,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 20,
    ) -> dict[str, Any]:
        if page_id is not None and not apikeys.may_see(api_key, page_id):
            return {"jobs": [], "next_cursor": None}
        with session_scope(engine) as session:
            jobs = repo.list_jobs(
                session,
                status=status,
                page_id=page_id,
                page_ids=api_key.page_ids,
                limit=limit,
                before=_after(cursor),
            )
            views = [job_view(repo.job_progress(session, job_id=job.id)) for job in jobs]
        last = jobs[-1] if len(jobs) == limit else None
        return {"jobs": views, "next_cursor": _cursor(last.created_at, last.id) if last else None}

    def action(run: Callable[..., Any], **extra: Any) -> Callable[..., dict[str, Any]]:
        def act(job_id: uuid.UUID, api_key: Key) -> dict[str, Any]:
            with session_scope(engine) as session:
                apikeys.visible_job(session, api_key, job_id)
                run(session, job_id=job_id, **extra)
            return job_of(api_key, job_id)

        return act

    api.post("/jobs/{job_id}/cancel")(action(commands.cancel_job, recovery=recovery))
    api.post("/jobs/{job_id}/pause")(action(commands.pause_job))
    api.post("/jobs/{job_id}/resume")(action(commands.resume_job))
    api.post("/jobs/{job_id}/retry")(action(commands.requeue_job))
    api.get("/jobs/{job_id}/events")(events_endpoint(engine, key))
    return api
