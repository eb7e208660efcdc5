"""job shards

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 03:46:23.266573
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "send_job_shards",
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("psid_after", sa.Text(), nullable=False),
        sa.Column("psid_last", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done')", name=op.f("ck_send_job_shards_status_valid")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["send_jobs.id"],
            name=op.f("fk_send_job_shards_job_id_send_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "shard", name=op.f("pk_send_job_shards")),
    )


def downgrade() -> None:
    op.drop_table("send_job_shards")
