"""rich messages: content beside the text, attachments uploaded once per job

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("send_jobs", "text", existing_type=sa.Text(), nullable=True)
    op.add_column("send_jobs", sa.Column("content", pg.JSONB(), nullable=True))
    op.add_column("send_jobs", sa.Column("attachment_id", sa.Text(), nullable=True))
    op.add_column(
        "send_jobs", sa.Column("attachment_upload_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_check_constraint(
        op.f("ck_send_jobs_text_or_attachment"),
        "send_jobs",
        "text IS NOT NULL OR content -> 'attachment' IS NOT NULL",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_send_jobs_text_or_attachment"), "send_jobs", type_="check")
    # An attachment job keeps a stand-in text: the older schema has no message without one.
    op.execute("UPDATE send_jobs SET text = '[attachment]' WHERE text IS NULL")
    for name in ("attachment_upload_at", "attachment_id", "content"):
        op.drop_column("send_jobs", name)
    op.alter_column("send_jobs", "text", existing_type=sa.Text(), nullable=False)
