"""The sweep flow: end dead runs and start every due job, so nothing pending or stuck is left
behind. Scheduled every minute by ``prefect.yaml``; ``pagecast sweep`` does the same without
Prefect."""

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment
from pydantic import Field

from flows.send_job import SEND_JOB_DEPLOYMENT
from pagecast.db import ready_engine, session_scope
from pagecast.lifecycle import Recovery
from pagecast.settings import get_settings
from pagecast.sweeps import sweep_jobs


@flow(name="sweep")
def sweep(limit: Annotated[int, Field(ge=1, le=10_000)] = 100) -> list[dict[str, Any]]:
    """Start a ``send-job`` run for each due pending job and each job whose runner died."""
    logger = get_run_logger()
    settings = get_settings()
    recovery = Recovery.from_settings(settings)
    with session_scope(ready_engine(settings)) as session:
        items = sweep_jobs(session, recovery=recovery, limit=limit)
    rows = []
    for item in items:
        run_name = "-"
        if item.start:
            flow_run = run_deployment(
                SEND_JOB_DEPLOYMENT,
                parameters={"job_id": str(item.job_id)},
                timeout=0,
                idempotency_key=item.run_key(recovery.lease_seconds),
                as_subflow=False,
            )
            run_name = str(flow_run.name)
        rows.append(
            {
                "job": str(item.job_id),
                "reason": item.reason,
                "in-flight recipients settled": item.orphans_settled,
                "send-job run": run_name,
            }
        )
        logger.info("%s: send-job run %s", item.describe(), run_name)
    create_table_artifact(
        rows
        or [
            {
                "job": "-",
                "reason": "nothing due",
                "in-flight recipients settled": 0,
                "send-job run": "-",
            }
        ],
        key="pagecast-sweep",
        description="Jobs the last sweep started",
    )
    return rows
