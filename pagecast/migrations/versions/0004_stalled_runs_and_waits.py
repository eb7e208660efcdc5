"""stalled runs and waits

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 14:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "send_jobs",
        sa.Column("progress_at_claim", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "send_jobs", sa.Column("stalled_runs", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "send_jobs", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("send_jobs", sa.Column("waiting_for", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("send_jobs", "waiting_for")
    op.drop_column("send_jobs", "next_attempt_at")
    op.drop_column("send_jobs", "stalled_runs")
    op.drop_column("send_jobs", "progress_at_claim")
