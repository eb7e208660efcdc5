"""webhook events, delivery and read receipts

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_RECEIPT_COLUMNS = ("attempted_at", "delivered_at", "read_at")


def upgrade() -> None:
    for name in ("delivered", "read"):
        op.add_column(
            "send_jobs", sa.Column(name, sa.Integer(), server_default="0", nullable=False)
        )
    for name in _RECEIPT_COLUMNS:
        op.add_column(
            "send_job_recipients", sa.Column(name, sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        sa.Column("page_id", sa.Text(), nullable=False),
        sa.Column("psid", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opt_out", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("apply_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('delivery', 'read', 'message', 'postback')",
            name=op.f("ck_webhook_events_kind_valid"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_webhook_events_dedupe_key")),
    )
    op.create_index(
        "ix_webhook_events_unapplied",
        "webhook_events",
        ["id"],
        postgresql_where=sa.text("applied_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_events_unapplied", table_name="webhook_events")
    op.drop_table("webhook_events")
    for name in _RECEIPT_COLUMNS:
        op.drop_column("send_job_recipients", name)
    for name in ("delivered", "read"):
        op.drop_column("send_jobs", name)
