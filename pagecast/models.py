"""Tables: a send job, one row per recipient of a job, its test sends, a page's contacts, the
Messenger webhook events received for them, and the HTTP API's keys."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlmodel import Field, SQLModel

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MAX_TEXT_LENGTH = 2000
MAX_PSID_LENGTH = 20


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_JOB_STATUSES = frozenset(
    {JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS, JobStatus.FAILED, JobStatus.CANCELLED}
)


class RecipientStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNKNOWN = "unknown"


IN_FLIGHT_RECIPIENT_STATUSES = frozenset({RecipientStatus.CLAIMED, RecipientStatus.SENDING})


class ShardStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class TestSendStatus(StrEnum):
    SENDING = "sending"  # written before the call: left so, the outcome is unknown
    SENT = "sent"
    FAILED = "failed"
    UNKNOWN = "unknown"


class MessagingType(StrEnum):
    RESPONSE = "RESPONSE"
    UPDATE = "UPDATE"
    MESSAGE_TAG = "MESSAGE_TAG"


class MessageTag(StrEnum):
    ACCOUNT_UPDATE = "ACCOUNT_UPDATE"
    CONFIRMED_EVENT_UPDATE = "CONFIRMED_EVENT_UPDATE"
    POST_PURCHASE_UPDATE = "POST_PURCHASE_UPDATE"
    HUMAN_AGENT = "HUMAN_AGENT"
    CUSTOMER_FEEDBACK = "CUSTOMER_FEEDBACK"


def _in_check(column: str, enum: type[StrEnum]) -> sa.CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum)
    return sa.CheckConstraint(f"{column} IN ({values})", name=f"{column}_valid")


def _now_column(*, onupdate: bool = False) -> Any:
    return sa.Column(
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.func.now(),
        onupdate=sa.func.now() if onupdate else None,
    )


def _counter() -> Any:
    return Field(default=0, sa_column_kwargs={"server_default": "0", "nullable": False})


class SendJob(SQLModel, table=True):
    """One broadcast: a message (``text``, and ``content`` beyond text: see ``pagecast.content``),
    a page, an audience in ``send_job_recipients``, and its progress."""

    __tablename__ = "send_jobs"
    __table_args__ = (
        _in_check("status", JobStatus),
        _in_check("messaging_type", MessagingType),
        sa.CheckConstraint(
            "(messaging_type = 'MESSAGE_TAG') = (tag IS NOT NULL)", name="tag_iff_message_tag"
        ),
        sa.CheckConstraint(
            f"char_length(text) BETWEEN 1 AND {MAX_TEXT_LENGTH}", name="text_length"
        ),
        sa.CheckConstraint(
            "text IS NOT NULL OR content -> 'attachment' IS NOT NULL", name="text_or_attachment"
        ),
        sa.CheckConstraint("concurrency > 0", name="concurrency_positive"),
        sa.CheckConstraint("rate_per_second > 0", name="rate_positive"),
        sa.Index("ix_send_jobs_status_scheduled_at", "status", "scheduled_at"),
        sa.UniqueConstraint("page_id", "idempotency_key"),  # a key names one job per page
    )

    id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
    )
    page_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False, index=True))
    text: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    content: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(pg.JSONB))
    attachment_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    attachment_upload_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    messaging_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    tag: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    status: str = Field(
        default=JobStatus.PENDING,
        sa_column=sa.Column(sa.Text, nullable=False, server_default=JobStatus.PENDING.value),
    )
    source: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    total: int = _counter()
    sent: int = _counter()
    failed: int = _counter()
    skipped: int = _counter()
    unknown: int = _counter()
    delivered: int = _counter()
    read: int = _counter()
    duplicates_removed: int = _counter()
    concurrency: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    rate_per_second: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    resend_unknown: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    scheduled_at: datetime = Field(sa_column=_now_column())
    created_at: datetime = Field(sa_column=_now_column())
    updated_at: datetime = Field(sa_column=_now_column(onupdate=True))
    started_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    finished_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    heartbeat_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    lease_owner: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    attempt: int = _counter()
    cancel_requested: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    idempotency_key: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    request_fingerprint: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    progress_at_claim: int = _counter()
    stalled_runs: int = _counter()
    next_attempt_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    waiting_for: str | None = Field(default=None, sa_column=sa.Column(sa.Text))


class SendJobRecipient(SQLModel, table=True):
    """One recipient of one job and its fate; ``(job_id, psid)`` is unique, so nobody is listed twice."""

    __tablename__ = "send_job_recipients"
    __table_args__ = (
        _in_check("status", RecipientStatus),
        sa.Index(
            "ix_send_job_recipients_pending",
            "job_id",
            "psid",
            postgresql_where=sa.text("status = 'pending'"),
        ),
        sa.Index("ix_send_job_recipients_job_status", "job_id", "status"),
    )

    job_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True),
            sa.ForeignKey("send_jobs.id", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    psid: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    first_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    status: str = Field(
        default=RecipientStatus.PENDING,
        sa_column=sa.Column(sa.Text, nullable=False, server_default=RecipientStatus.PENDING.value),
    )
    attempts: int = _counter()
    message_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    error_code: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    error_subcode: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    error_key: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    retryable: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    attempted_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    delivered_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    read_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    updated_at: datetime = Field(sa_column=_now_column(onupdate=True))


class SendJobShard(SQLModel, table=True):
    """A disjoint PSID range of a large job (``psid_after`` < psid ≤ ``psid_last``), sent by a child
    run under its own lease while the job's run holds the job."""

    __tablename__ = "send_job_shards"
    __table_args__ = (_in_check("status", ShardStatus),)

    job_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True),
            sa.ForeignKey("send_jobs.id", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    shard: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True, autoincrement=False))
    psid_after: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    psid_last: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    status: str = Field(
        default=ShardStatus.PENDING,
        sa_column=sa.Column(sa.Text, nullable=False, server_default=ShardStatus.PENDING.value),
    )
    lease_owner: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    attempt: int = _counter()
    heartbeat_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    updated_at: datetime = Field(sa_column=_now_column(onupdate=True))


class JobTestSend(SQLModel, table=True):
    """A test send of a job's message to one PSID (``pagecast job test``): not a recipient of the
    job and not in its counters."""

    __tablename__ = "job_test_sends"
    __table_args__ = (_in_check("status", TestSendStatus),)

    id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
    )
    job_id: uuid.UUID = Field(
        sa_column=sa.Column(
            pg.UUID(as_uuid=True),
            sa.ForeignKey("send_jobs.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    psid: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    status: str = Field(
        default=TestSendStatus.SENDING,
        sa_column=sa.Column(sa.Text, nullable=False, server_default=TestSendStatus.SENDING.value),
    )
    message_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    error_key: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = Field(sa_column=_now_column())
    updated_at: datetime = Field(sa_column=_now_column(onupdate=True))


class PageSendRate(SQLModel, table=True):
    """A page's shared send schedule: the next free send slot and the throttling backoff factor.

    Every runner sending for the page reserves its slots here, so the page's rate holds across
    runs, workers and machines."""

    __tablename__ = "page_send_rates"

    page_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    next_slot_at: datetime = Field(sa_column=_now_column())
    backoff_factor: float = Field(
        default=1.0, sa_column=sa.Column(sa.Float, nullable=False, server_default="1")
    )
    throttled_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    updated_at: datetime = Field(sa_column=_now_column(onupdate=True))


class Contact(SQLModel, table=True):
    """A person who has messaged a page: who they are, their tags, and when they last wrote."""

    __tablename__ = "contacts"
    __table_args__ = (sa.Index("ix_contacts_tags", "tags", postgresql_using="gin"),)

    page_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    psid: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    first_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    tags: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(
            pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")
        ),
    )
    opted_out: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    last_interaction_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    created_at: datetime = Field(sa_column=_now_column())
    updated_at: datetime = Field(sa_column=_now_column(onupdate=True))


class WebhookEventKind(StrEnum):
    DELIVERY = "delivery"
    READ = "read"
    MESSAGE = "message"
    POSTBACK = "postback"


class WebhookEvent(SQLModel, table=True):
    """One Messenger webhook event as received, stored once (``dedupe_key``: Meta redelivers) and
        applied to recipients and contacts later (``applied_at``; not before ``apply_after`` when its
    recipient was still in flight). The user's words are not kept."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        _in_check("kind", WebhookEventKind),
        sa.Index(
            "ix_webhook_events_unapplied", "id", postgresql_where=sa.text("applied_at IS NULL")
        ),
    )

    id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True)
    )
    dedupe_key: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    page_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    psid: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    kind: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    occurred_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    opt_out: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    received_at: datetime = Field(sa_column=_now_column())
    apply_after: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    applied_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )


class ApiKey(SQLModel, table=True):
    """A key of the HTTP job API: its hash only (the key is shown once), and the pages it may see
    (none listed: every page)."""

    __tablename__ = "api_keys"

    id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        sa_column=sa.Column(
            pg.UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
        ),
    )
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    key_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False, unique=True))
    key_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    page_ids: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(
            pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")
        ),
    )
    created_at: datetime = Field(sa_column=_now_column())
    last_used_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
