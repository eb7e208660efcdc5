"""idempotency keys per page, request fingerprints

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 15:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("uq_send_jobs_idempotency_key", "send_jobs", type_="unique")
    op.create_unique_constraint(
        op.f("uq_send_jobs_page_id"), "send_jobs", ["page_id", "idempotency_key"]
    )
    op.add_column("send_jobs", sa.Column("request_fingerprint", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("send_jobs", "request_fingerprint")
    op.drop_constraint(op.f("uq_send_jobs_page_id"), "send_jobs", type_="unique")
    op.create_unique_constraint("uq_send_jobs_idempotency_key", "send_jobs", ["idempotency_key"])
