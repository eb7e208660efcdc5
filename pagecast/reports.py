"""Human summaries of a job: the rows of the final table (no PSIDs, no token)."""

from typing import Any

from pagecast.chunks import TEXT_TOO_LONG
from pagecast.graph import OUTSIDE_WINDOW
from pagecast.models import SendJob


def job_summary_rows(job: SendJob) -> list[dict[str, Any]]:
    """Counts, error codes with their counts and Meta's messages, and durations."""
    rows: list[dict[str, Any]] = [
        {"item": "status", "value": job.status, "detail": job.last_error or ""},
        {"item": "total", "value": job.total, "detail": f"page {job.page_id}, {job.source}"},
        {"item": "sent", "value": job.sent, "detail": ""},
        {"item": "failed", "value": job.failed, "detail": ""},
        {"item": "skipped", "value": job.skipped, "detail": ""},
        {
            "item": "unknown",
            "value": job.unknown,
            "detail": "in flight when a runner died; not resent",
        },
    ]
    messages = {
        sample["code"]: sample["message"] for sample in job.error_summary.get("samples", [])
    }
    for code, count in sorted(
        (job.error_summary.get("by_code") or {}).items(), key=lambda kv: -kv[1]
    ):
        label = {OUTSIDE_WINDOW: "skipped", TEXT_TOO_LONG: "failed"}.get(code, "error")
        rows.append({"item": f"{label} {code}", "value": count, "detail": messages.get(code, "")})
    if job.started_at and job.finished_at:
        seconds = (job.finished_at - job.started_at).total_seconds()
        done = job.sent + job.failed + job.skipped + job.unknown
        rate = f"{done / seconds:.1f} recipients/s" if seconds > 0 else ""
        rows.append({"item": "duration", "value": f"{seconds:.1f} s", "detail": rate})
    return rows
