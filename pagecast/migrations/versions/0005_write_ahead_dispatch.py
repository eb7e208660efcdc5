"""write-ahead dispatch: claimed recipients, error keys, throttle windows

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 23:15:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_STATUSES = "'pending', 'sending', 'sent', 'failed', 'skipped', 'unknown'"


def _recipient_statuses(statuses: str) -> None:
    name = op.f("ck_send_job_recipients_status_valid")
    op.drop_constraint(name, "send_job_recipients", type_="check")
    op.create_check_constraint(name, "send_job_recipients", f"status IN ({statuses})")


def upgrade() -> None:
    _recipient_statuses(f"'claimed', {_STATUSES}")
    op.add_column("send_job_recipients", sa.Column("error_key", sa.Text(), nullable=True))
    op.execute(
        "UPDATE send_job_recipients SET error_key = CASE "
        "WHEN error_code IS NULL AND error_message IN ('outside_24h_window', 'rendered_text_too_long') "
        "THEN error_message "
        "WHEN error_subcode IS NULL THEN error_code::text "
        "ELSE error_code || '/' || error_subcode END "
        "WHERE status IN ('failed', 'skipped', 'unknown')"
    )
    op.drop_column("send_jobs", "error_summary")
    op.add_column(
        "page_send_rates", sa.Column("throttled_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("page_send_rates", "throttled_at")
    op.add_column(
        "send_jobs",
        sa.Column(
            "error_summary",
            pg.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.drop_column("send_job_recipients", "error_key")
    op.execute("UPDATE send_job_recipients SET status = 'pending' WHERE status = 'claimed'")
    _recipient_statuses(_STATUSES)
