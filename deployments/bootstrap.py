"""Bootstrap a Prefect server for pagecast; safe to run again at any time.

    uv run python -m deployments.bootstrap      (or: make deploy)

Creates the ``pagecast`` process work pool, the tag concurrency limit on ``send-chunk`` tasks,
one Secret block per page token found in the environment, every deployment of ``prefect.yaml``
(the sweep every ``PAGECAST_SWEEP_INTERVAL_SECONDS``), and, when ``PAGECAST_NOTIFY_URL`` is set,
a webhook block and an automation that posts each job's summary to it when the job ends."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from prefect import get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.schedules import IntervalSchedule
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectAlreadyExists
from prefect.workers.process import ProcessWorker

from pagecast.settings import Settings, get_settings
from tasks.sending import SEND_TAG
from tasks.tokens import secret_block_name

PROJECT_DIR = Path(__file__).resolve().parents[1]
WORK_POOL = "pagecast"
TOKEN_PREFIX = "PAGECAST_PAGE_ACCESS_TOKEN__"
NOTIFY_BLOCK = "pagecast-job-summary"
AUTOMATION = "pagecast: job summary to webhook"
SWEEP_DEPLOYMENT = "sweep/sweep"
YAML_SWEEP_INTERVAL_SECONDS = 60  # prefect.yaml's cron: every minute
SUMMARY_BODY = (
    "job {{ event.payload.job_id }} on page {{ event.payload.page_id }} ended "
    "{{ event.payload.status }}: {{ event.payload.sent }} sent, {{ event.payload.failed }} failed, "
    "{{ event.payload.skipped }} skipped, {{ event.payload.unknown }} unknown of "
    "{{ event.payload.total }}"
)


async def ensure_work_pool() -> None:
    """The process work pool every pagecast deployment runs on, with the process worker's base job
    template. An existing pool keeps its template: ``create_work_pool(overwrite=True)`` would
    replace it with an empty one, which a running worker then writes back from inside its
    websocket setup transaction (a lock error on a busy SQLite-backed server)."""
    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        try:
            await client.create_work_pool(
                WorkPoolCreate(name=WORK_POOL, type="process", base_job_template=template)
            )
        except ObjectAlreadyExists:
            pool = await client.read_work_pool(WORK_POOL)
            if not pool.base_job_template:
                await client.update_work_pool(WORK_POOL, WorkPoolUpdate(base_job_template=template))


async def ensure_send_limit(settings: Settings) -> None:
    """Bound the chunk tasks in flight across every run (tag concurrency limit)."""
    async with get_client() as client:
        await client.create_concurrency_limit(
            tag=SEND_TAG, concurrency_limit=settings.chunk_task_limit
        )


def save_token_secrets() -> list[str]:
    """One Secret block per ``PAGECAST_PAGE_ACCESS_TOKEN__<PAGE_ID>``; returns the page ids."""
    pages = []
    for name, value in sorted(os.environ.items()):
        if name.startswith(TOKEN_PREFIX) and value:
            page_id = name.removeprefix(TOKEN_PREFIX)
            Secret(value=value).save(secret_block_name(page_id), overwrite=True)
            pages.append(page_id)
    return pages


def deploy_all() -> None:
    """Apply every deployment of prefect.yaml, anchored to this checkout."""
    subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=PROJECT_DIR,
        env=os.environ | {"PAGECAST_PROJECT_DIR": str(PROJECT_DIR)},
        check=True,
    )


async def schedule_sweep(seconds: int) -> None:
    """The sweep every ``seconds`` in place of prefect.yaml's every minute."""
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(SWEEP_DEPLOYMENT)
        for schedule in deployment.schedules:
            await client.update_deployment_schedule(
                deployment.id, schedule.id, schedule=IntervalSchedule(interval=seconds)
            )


async def ensure_notification(url: str) -> None:
    """A webhook block and an automation posting a summary when a job finishes or fails."""
    block = CustomWebhookNotificationBlock(
        name=NOTIFY_BLOCK, url=url, json_data={"subject": "{{subject}}", "summary": "{{body}}"}
    )
    block_id = await block.save(NOTIFY_BLOCK, overwrite=True)
    automation = AutomationCore(
        name=AUTOMATION,
        description="Posts a pagecast job's counts to PAGECAST_NOTIFY_URL when the job ends.",
        trigger=EventTrigger(
            expect={"pagecast.job.finished", "pagecast.job.failed"},
            match={"prefect.resource.id": "pagecast.job.*"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="pagecast job {{ event.payload.status }}",
                body=SUMMARY_BODY,
            )
        ],
    )
    async with get_client() as client:
        for existing in await client.read_automations_by_name(AUTOMATION):
            await client.delete_automation(existing.id)
        await client.create_automation(automation)


def bootstrap(settings: Settings) -> None:
    """Everything pagecast needs on the Prefect server, created or brought up to date."""
    asyncio.run(ensure_work_pool())
    asyncio.run(ensure_send_limit(settings))
    pages = save_token_secrets()
    print(f"work pool {WORK_POOL!r}, limit {settings.chunk_task_limit} on tag {SEND_TAG!r}")
    print(
        f"Secret blocks for pages: {', '.join(pages) or 'none (no PAGECAST_PAGE_ACCESS_TOKEN__<PAGE_ID>)'}"
    )
    deploy_all()
    if settings.sweep_interval_seconds != YAML_SWEEP_INTERVAL_SECONDS:
        asyncio.run(schedule_sweep(settings.sweep_interval_seconds))
        print(f"sweep every {settings.sweep_interval_seconds} s")
    if settings.notify_url:
        asyncio.run(ensure_notification(settings.notify_url))
        print(f"automation {AUTOMATION!r} posts job summaries to {settings.notify_url}")


if __name__ == "__main__":
    bootstrap(get_settings())
