"""Where the runs a sweep starts happen: on the Prefect server, through the ``send-job``
deployment, when an API is configured, answers, and has a worker online for the deployment's
pool; otherwise in this process (``runner.run_in_process``) with page tokens from the
environment. ``pagecast sweep`` (cron, a Kubernetes CronJob, a container) drives it."""

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pagecast import launch, repo, trigger
from pagecast.db import ready_engine, session_scope
from pagecast.lifecycle import Recovery
from pagecast.models import SendJob
from pagecast.runner import run_in_process
from pagecast.settings import Settings, page_token_from_env
from pagecast.sweeps import SweepItem, sweep_jobs

SEND_JOB = ("send-job", "send-job")


@dataclass(frozen=True)
class Target:
    """Where this sweep's runs go: the Prefect API (``None``: this process), and why."""

    api_url: str | None
    reason: str


def choose_target(settings: Settings) -> Target:
    """The Prefect server when it can run ``send-job`` now, else this process."""
    api_url = launch.prefect_api_url(settings)
    if not api_url:
        return Target(None, "no Prefect API is configured (PREFECT_API_URL, or `make up`)")
    if not trigger.reachable(api_url):
        return Target(None, f"the Prefect API at {api_url} does not answer")
    deployment = trigger.find_deployment(
        api_url, flow_name=SEND_JOB[0], deployment_name=SEND_JOB[1]
    )
    if deployment is None:
        return Target(None, f"{api_url} has no send-job deployment (`make deploy`)")
    if not deployment.workers_online:
        return Target(None, f"no worker is online for work pool {deployment.work_pool!r}")
    return Target(api_url, f"send-job runs on {api_url}, work pool {deployment.work_pool!r}")


def _counts(job: SendJob) -> str:
    return (
        f"{job.status}: {job.sent} sent, {job.failed} failed, {job.skipped} skipped, "
        f"{job.unknown} unknown of {job.total}"
    )


class Sweeper:
    """Sweeps once or on an interval; prints one line per job it acts on through ``say``."""

    def __init__(self, settings: Settings, say: Callable[[str], None], *, limit: int = 100):
        self.settings = settings
        self.engine = ready_engine(settings)
        self.recovery = Recovery.from_settings(settings)
        self.say = say
        self.limit = limit
        self._here: dict[uuid.UUID, asyncio.Task[None]] = {}

    async def sweep(self) -> None:
        """End dead runs, then start every due job; runs in this process go on in the background
        (``drain`` waits for them)."""
        items = await asyncio.to_thread(self._sweep_jobs)
        to_start = [i for i in items if i.start and i.job_id not in self._here]
        for item in items:
            if not item.start:
                self.say(f"{item.describe()}: not restarted now")
        if not to_start:
            return
        target = await asyncio.to_thread(choose_target, self.settings)
        if target.api_url is None:
            self.say(f"sweep: sending {len(to_start)} job(s) in this process: {target.reason}")
        for item in to_start:
            if target.api_url:
                await asyncio.to_thread(self._submit, target.api_url, item)
            else:
                task = asyncio.create_task(self._send_here(item))
                self._here[item.job_id] = task
                task.add_done_callback(lambda _, job_id=item.job_id: self._here.pop(job_id))

    def _sweep_jobs(self) -> list[SweepItem]:
        with session_scope(self.engine) as session:
            return sweep_jobs(session, recovery=self.recovery, limit=self.limit)

    def _submit(self, api_url: str, item: SweepItem) -> None:
        run = trigger.submit(
            api_url,
            flow_name=SEND_JOB[0],
            deployment_name=SEND_JOB[1],
            parameters={"job_id": str(item.job_id)},
            idempotency_key=item.run_key(self.recovery.lease_seconds),
        )
        self.say(f"{item.describe()}: send-job run {run.name} ({run.ui_url})")

    async def _send_here(self, item: SweepItem) -> None:
        with session_scope(self.engine) as session:
            job = repo.get_job(session, job_id=item.job_id)
            token = page_token_from_env(job.page_id)
            if token is None:
                waiting = (
                    f"a token for page {job.page_id}: set PAGECAST_PAGE_ACCESS_TOKEN__{job.page_id} "
                    "where `pagecast sweep` runs, or run a Prefect worker (Secret blocks)"
                )
                repo.set_waiting_for(session, job_id=job.id, waiting_for=waiting)
        if token is None:
            self.say(f"{item.describe()}: left pending, waiting for {waiting}")
            return
        try:
            ended = await run_in_process(
                self.engine, self.settings, job_id=item.job_id, token_for=lambda _page: token
            )
        except Exception as error:  # the run ended the job failed; the sweep goes on
            self.say(f"{item.describe()}: sent here, the run crashed: {error}")
            return
        if ended is None:
            self.say(f"{item.describe()}: another runner claimed it first")
        else:
            self.say(f"{item.describe()}: sent here, {_counts(ended)}")

    async def drain(self) -> None:
        """Wait until every run started in this process has ended."""
        while self._here:
            await asyncio.wait(list(self._here.values()))

    async def once(self) -> None:
        """One sweep, then wait for the runs it started in this process."""
        await self.sweep()
        await self.drain()

    async def forever(self, every: float) -> None:
        """Sweep every ``every`` seconds; runs in this process go on between sweeps."""
        while True:
            await self.sweep()
            await asyncio.sleep(every)
