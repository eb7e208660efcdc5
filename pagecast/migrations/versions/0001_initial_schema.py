"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24 02:21:38.554414
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("page_id", sa.Text(), nullable=False),
        sa.Column("psid", sa.Text(), nullable=False),
        sa.Column("first_name", sa.Text(), nullable=True),
        sa.Column("last_name", sa.Text(), nullable=True),
        sa.Column(
            "tags",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.Column("opted_out", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("last_interaction_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("page_id", "psid", name=op.f("pk_contacts")),
    )
    op.create_index("ix_contacts_tags", "contacts", ["tags"], unique=False, postgresql_using="gin")
    op.create_table(
        "send_jobs",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("page_id", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("messaging_type", sa.Text(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("sent", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("skipped", sa.Integer(), server_default="0", nullable=False),
        sa.Column("unknown", sa.Integer(), server_default="0", nullable=False),
        sa.Column("duplicates_removed", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "error_summary",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("rate_per_second", sa.Float(), nullable=False),
        sa.Column("resend_unknown", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "scheduled_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "(messaging_type = 'MESSAGE_TAG') = (tag IS NOT NULL)",
            name=op.f("ck_send_jobs_tag_iff_message_tag"),
        ),
        sa.CheckConstraint(
            "messaging_type IN ('RESPONSE', 'UPDATE', 'MESSAGE_TAG')",
            name=op.f("ck_send_jobs_messaging_type_valid"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'paused', 'completed', 'completed_with_errors', 'failed', 'cancelled')",
            name=op.f("ck_send_jobs_status_valid"),
        ),
        sa.CheckConstraint(
            "char_length(text) BETWEEN 1 AND 2000", name=op.f("ck_send_jobs_text_length")
        ),
        sa.CheckConstraint("concurrency > 0", name=op.f("ck_send_jobs_concurrency_positive")),
        sa.CheckConstraint("rate_per_second > 0", name=op.f("ck_send_jobs_rate_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_jobs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_send_jobs_idempotency_key")),
    )
    op.create_index(op.f("ix_send_jobs_page_id"), "send_jobs", ["page_id"], unique=False)
    op.create_index(
        "ix_send_jobs_status_scheduled_at", "send_jobs", ["status", "scheduled_at"], unique=False
    )
    op.create_table(
        "send_job_recipients",
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("psid", sa.Text(), nullable=False),
        sa.Column("first_name", sa.Text(), nullable=True),
        sa.Column("last_name", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("error_subcode", sa.Integer(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sending', 'sent', 'failed', 'skipped', 'unknown')",
            name=op.f("ck_send_job_recipients_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["send_jobs.id"],
            name=op.f("fk_send_job_recipients_job_id_send_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "psid", name=op.f("pk_send_job_recipients")),
    )
    op.create_index(
        "ix_send_job_recipients_job_status",
        "send_job_recipients",
        ["job_id", "status"],
        unique=False,
    )
    op.create_index(
        "ix_send_job_recipients_pending",
        "send_job_recipients",
        ["job_id", "psid"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_send_job_recipients_pending",
        table_name="send_job_recipients",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_send_job_recipients_job_status", table_name="send_job_recipients")
    op.drop_table("send_job_recipients")
    op.drop_index("ix_send_jobs_status_scheduled_at", table_name="send_jobs")
    op.drop_index(op.f("ix_send_jobs_page_id"), table_name="send_jobs")
    op.drop_table("send_jobs")
    op.drop_index("ix_contacts_tags", table_name="contacts", postgresql_using="gin")
    op.drop_table("contacts")
