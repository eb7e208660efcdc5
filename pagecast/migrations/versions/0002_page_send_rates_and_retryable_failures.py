"""page send rates and retryable failures

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 02:32:02.405902
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "page_send_rates",
        sa.Column("page_id", sa.Text(), nullable=False),
        sa.Column(
            "next_slot_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("backoff_factor", sa.Float(), server_default="1", nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("page_id", name=op.f("pk_page_send_rates")),
    )
    op.add_column(
        "send_job_recipients",
        sa.Column("retryable", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("send_job_recipients", "retryable")
    op.drop_table("page_send_rates")
