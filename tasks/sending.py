"""The mapped task that sends one chunk of a job."""

import asyncio
import uuid
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from pagecast.chunks import ChunkBounds
from pagecast.chunks import send_chunk as send_chunk_core
from pagecast.db import get_engine
from pagecast.errors import GraphError, InvalidInput, LeaseLost, MissingPageToken
from pagecast.graph import client_factory
from pagecast.leases import Lease
from pagecast.settings import get_settings
from tasks.tokens import page_token

SEND_TAG = "pagecast-send"
_NOT_RETRYABLE = (LeaseLost, MissingPageToken, InvalidInput, GraphError)


def retry_transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a chunk after infrastructure failures (database, network), never after a lost lease,
    a missing token or a Graph error (those are already settled per recipient)."""
    try:
        state.result()
    except _NOT_RETRYABLE:
        return False
    except Exception:
        return True
    return False


@task(
    name="send-chunk",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient_only,
    tags=[SEND_TAG],
    cache_policy=NO_CACHE,
)
def send_chunk(
    job_id: uuid.UUID,
    page_id: str,
    owner: str,
    attempt: int,
    after: str,
    last: str,
    chunks_in_flight: int = 1,
    shard: int | None = None,
) -> dict[str, Any]:
    """Send the job's pending recipients with ``after`` < psid ≤ ``last``, with this chunk's share
    of the job's concurrency; returns the counts."""
    settings = get_settings()
    token = page_token(page_id)
    result = asyncio.run(
        send_chunk_core(
            get_engine(settings),
            lease=Lease(job_id=job_id, owner=owner, attempt=attempt, shard=shard),
            bounds=ChunkBounds(after=after, last=last),
            client_factory=client_factory(settings, lambda _page_id: token),
            chunks_in_flight=chunks_in_flight,
            give_up_after=settings.db_retry_seconds,
            outage_pause_after=settings.outage_pause_seconds,
        )
    )
    return result.as_dict()
