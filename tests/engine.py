"""Helpers to run the send engine in-process, without Prefect, against the sandbox."""

import os
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, select

from pagecast import db, repo
from pagecast.audience import recipients_from_psids
from pagecast.models import SendJob, SendJobRecipient
from pagecast.runner import run_in_process
from pagecast.settings import Settings
from pagecast.validation import validate_message

PAGE = "100200300"


def admin_execute(server_url: str, statement: str) -> None:
    """Run one statement outside a transaction (CREATE or DROP DATABASE) on ``server_url``."""
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with engine.connect() as connection:
        connection.execute(sa.text(statement))
    engine.dispose()


def make_settings(database_url: str, sandbox_url: str, **overrides) -> Settings:
    return Settings(
        database_url=database_url,
        graph_api_url=sandbox_url,
        chunk_size=overrides.pop("chunk_size", 50),
        **overrides,
    )


def create_job(
    engine: sa.Engine, count: int, *, text="Hi {first_name}", rate=300.0, concurrency=50, **kw
):
    psids = [str(10**15 + i) for i in range(count)]
    request = repo.JobRequest(
        page_id=kw.pop("page_id", PAGE),
        message=validate_message(
            text, kw.pop("messaging_type", "UPDATE"), kw.pop("tag", None), kw.pop("content", None)
        ),
        audience=kw.pop("audience", None) or recipients_from_psids(psids),
        concurrency=concurrency,
        rate_per_second=rate,
        **kw,
    )
    with db.session_scope(engine) as session:
        return repo.create_job(session, request=request).job


async def run_job(
    engine: sa.Engine, settings: Settings, job_id: uuid.UUID, *, token="tok", owner=None
):
    return await run_in_process(
        engine, settings, job_id=job_id, token_for=lambda _page: token, owner=owner
    )


def job_row(engine: sa.Engine, job_id: uuid.UUID) -> SendJob:
    with Session(engine) as session:
        return session.get(SendJob, job_id)


def recipient_counts(engine: sa.Engine, job_id: uuid.UUID) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.exec(
            select(SendJobRecipient.status, sa.func.count())
            .where(SendJobRecipient.job_id == job_id)
            .group_by(SendJobRecipient.status)
        ).all()
    return dict(rows)


def assert_counters_match_rows(engine: sa.Engine, job_id: uuid.UUID) -> None:
    job = job_row(engine, job_id)
    counts = recipient_counts(engine, job_id)
    assert (job.sent, job.failed, job.skipped, job.unknown) == tuple(
        counts.get(s, 0) for s in ("sent", "failed", "skipped", "unknown")
    )
    assert sum(counts.values()) == job.total


def errors_by_key(engine: sa.Engine, job_id: uuid.UUID) -> dict[str, int]:
    with Session(engine) as session:
        return {e.key: e.count for e in repo.error_counts(session, job_id=job_id)}


def process_env(home: Path, database_url: str, graph_url: str, **settings: str) -> dict[str, str]:
    """The environment of a ``pagecast`` process under test: this one's, without any
    ``PAGECAST_``/``PREFECT_`` setting, plus the home, database, Send API and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAGECAST_", "PREFECT_"))}
    return env | {
        "PAGECAST_HOME": str(home),
        "PAGECAST_DATABASE_URL": database_url,
        "PAGECAST_GRAPH_API_URL": graph_url,
        **settings,
    }
