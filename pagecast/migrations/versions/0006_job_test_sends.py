"""job test sends

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 12:10:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_test_sends",
        sa.Column(
            "id", pg.UUID(as_uuid=True), server_default=sa.text("gen_random_uuid()"), nullable=False
        ),
        sa.Column("job_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("psid", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="sending", nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("error_key", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "status IN ('sending', 'sent', 'failed', 'unknown')",
            name=op.f("ck_job_test_sends_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["send_jobs.id"],
            name=op.f("fk_job_test_sends_job_id_send_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_test_sends")),
    )
    op.create_index(op.f("ix_job_test_sends_job_id"), "job_test_sends", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_job_test_sends_job_id"), table_name="job_test_sends")
    op.drop_table("job_test_sends")
