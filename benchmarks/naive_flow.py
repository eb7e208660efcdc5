"""The naive design, the contender pagecast replaces: one Prefect task per recipient, each a
plain HTTP call with Prefect's retries, 100 at a time; no rate limit (Prefect's ``rate_limit()``
cannot hold 300/s) and no record of who was sent.

    python -m benchmarks.naive_flow PAGE_ID COUNT
        (PREFECT_API_URL, PAGECAST_GRAPH_API_URL and PAGECAST_PAGE_ACCESS_TOKEN from the env)
"""

import os
import sys

import httpx
from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

CONCURRENCY = 100


@task(retries=3, retry_delay_seconds=1)
def send_one(page_id: str, psid: str) -> None:
    response = httpx.post(
        f"{os.environ['PAGECAST_GRAPH_API_URL']}/v25.0/{page_id}/messages",
        json={
            "recipient": {"id": psid},
            "messaging_type": "UPDATE",
            "message": {"text": "Benchmark"},
        },
        headers={"Authorization": f"Bearer {os.environ['PAGECAST_PAGE_ACCESS_TOKEN']}"},
        timeout=30,
    )
    response.raise_for_status()


@flow(task_runner=ThreadPoolTaskRunner(max_workers=CONCURRENCY))
def naive_broadcast(page_id: str, count: int) -> None:
    psids = [str(10**15 + i) for i in range(count)]
    send_one.map(unmapped(page_id), psids).wait()


if __name__ == "__main__":
    naive_broadcast(sys.argv[1], int(sys.argv[2]))
