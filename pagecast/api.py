"""The HTTP job API, mounted at ``/v1`` by ``pagecast serve``: create a job, read it, list jobs,
act on one, and follow its progress (``GET /v1/jobs/{id}/events``, ``pagecast.progress``).

Every request carries ``Authorization: Bearer <key>`` (``pagecast api-key create``); a key limited
to pages sees only their jobs (another page's job is 404). Errors are RFC 9457 problem JSON that
name the field and the limit (``pagecast.problems``), from the same checks as the CLI; the schema
is at ``/v1/openapi.json``. A created, resumed or retried job starts through the ``send-job``
deployment when a Prefect API with a worker can run it now, else it waits for the sweep.
"""

import base64
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import httpx
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from pagecast import apikeys, commands, dispatch, lifecycle, repo, trigger
from pagecast.db import session_scope
from pagecast.errors import InvalidField, PagecastError
from pagecast.forms import JobForm, broadcast_request
from pagecast.models import ApiKey, JobStatus
from pagecast.preview import preview_job
from pagecast.problems import Gate, Problem, install
from pagecast.progress import events_endpoint
from pagecast.settings import Settings
from pagecast.validation import validate_scheduled_at
from pagecast.views import FailedAttempts, job_view

MAX_BODY_BYTES = 2_000_000
_MAX_PAGE = 100


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


def _request(body: JobForm, idempotency_key: str | None) -> repo.JobRequest:
    fields = body.model_dump(exclude={"dry_run", "scheduled_at", "quick_replies", "buttons"})
    fingerprint = hashlib.sha256(
        json.dumps(body.model_dump(mode="json", exclude={"dry_run"}), sort_keys=True).encode()
    ).hexdigest()
    request = broadcast_request(
        **fields,
        quick_replies=body.quick_replies,
        buttons=body.buttons,
        idempotency_key=idempotency_key,
        skip_invalid=body.dry_run,
        scheduled_at=validate_scheduled_at(body.scheduled_at, now=datetime.now().astimezone()),
    )
    return dataclasses.replace(request, fingerprint=fingerprint)


def create_api(settings: Settings, engine: sa.Engine) -> FastAPI:
    """The ``/v1`` application."""
    api = FastAPI(title="pagecast job API", version="1", openapi_url="/openapi.json")
    install(api)
    api.add_middleware(Gate, max_body=MAX_BODY_BYTES, open_paths=("/openapi.json", "/docs"))
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

    def key(request: Request, authorization: Annotated[str, Header()] = "") -> ApiKey:
        scheme, _, presented = authorization.partition(" ")
        with session_scope(engine) as session:
            found = (
                apikeys.authenticate(session, presented.strip())
                if scheme.lower() == "bearer"
                else None
            )
        client = request.client.host if request.client else "?"
        if found is None:
            if attempts.failed(client):
                raise Problem(429, "Too many failed attempts", "wait a minute before trying again")
            raise Problem(401, "Unauthorized", "a valid Authorization: Bearer <key> is required")
        return found

    Key = Annotated[ApiKey, Depends(key)]

    def view(api_key: ApiKey, job_id: uuid.UUID) -> dict[str, Any]:
        with session_scope(engine) as session:
            apikeys.visible_job(session, api_key, job_id)
            return job_view(repo.job_progress(session, job_id=job_id))

    def start(job_id: uuid.UUID) -> dict[str, Any]:
        """Start the job on the Prefect server when it can run it now; else say the sweep will."""
        try:
            with session_scope(engine) as session:
                commands.ensure_startable(session, job_id=job_id, recovery=recovery)
            target = dispatch.choose_target(settings)
            if target.api_url is None:
                return {"started": False, "reason": f"{target.reason}; the sweep starts it"}
            run = trigger.submit(
                target.api_url,
                flow_name=dispatch.SEND_JOB[0],
                deployment_name=dispatch.SEND_JOB[1],
                parameters={"job_id": str(job_id)},
                idempotency_key=f"api-{job_id}-{datetime.now().timestamp():.0f}",
            )
        except (PagecastError, httpx.HTTPError) as error:  # the job is written: the sweep has it
            return {"started": False, "reason": f"{error}; the sweep starts it when it can"}
        return {"started": True, "flow_run_id": str(run.flow_run_id), "ui_url": run.ui_url}

    @api.post("/jobs", status_code=201)
    def create_job(
        body: JobForm, api_key: Key, idempotency_key: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        if not apikeys.may_see(api_key, body.page_id):
            raise InvalidField("page_id", f"this API key may not send for page {body.page_id}")
        request = _request(body, idempotency_key)
        if body.dry_run:
            return JSONResponse(preview_job(engine, request=request).as_dict() | {"dry_run": True})
        with session_scope(engine) as session:
            created = repo.create_job(session, request=request)
        started = start(created.job.id) if created.created else {}
        answer = view(api_key, created.job.id) | {"created": created.created} | started
        return JSONResponse(answer, status_code=201 if created.created else 200)

    @api.get("/jobs/{job_id}")
    def get_job(job_id: uuid.UUID, api_key: Key) -> dict[str, Any]:
        return view(api_key, job_id)

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
            views = [job_view(progress) for progress in repo.jobs_progress(session, jobs)]
        last = jobs[-1] if len(jobs) == limit else None
        return {"jobs": views, "next_cursor": _cursor(last.created_at, last.id) if last else None}

    def action(run: Callable[..., Any], *, starts: bool = False, **extra: Any) -> Any:
        def act(job_id: uuid.UUID, api_key: Key) -> dict[str, Any]:
            with session_scope(engine) as session:
                apikeys.visible_job(session, api_key, job_id)
                run(session, job_id=job_id, **extra)
            return view(api_key, job_id) | (start(job_id) if starts else {})

        return act

    api.post("/jobs/{job_id}/cancel")(action(commands.cancel_job, recovery=recovery))
    api.post("/jobs/{job_id}/pause")(action(commands.pause_job))
    api.post("/jobs/{job_id}/resume")(action(commands.resume_job, starts=True))
    api.post("/jobs/{job_id}/retry")(action(commands.requeue_job, starts=True))
    api.get("/jobs/{job_id}/events")(events_endpoint(engine, key))
    return api
