"""Starting pagecast deployments over Prefect's REST API, without waiting for them, and asking
whether a worker would pick them up.

This is what an application backend calls instead of a fire-and-forget promise: the flow run is
recorded by Prefect before the call returns, and the same idempotency key always returns the same
run (Prefect ignores the parameters of a repeated key, so derive the key from all of them)."""

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from pagecast.errors import ConfigurationError

TRIGGER_TIMEOUT = 30.0
HEALTH_TIMEOUT = 3.0
BUSY_RETRIES = 5
BUSY_RETRY_SECONDS = 1.0


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One API call, repeated while the server answers 503 (busy); the idempotency key makes
    repeating a flow-run creation safe."""
    for _ in range(BUSY_RETRIES - 1):
        response = client.request(method, path, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(BUSY_RETRY_SECONDS)
    return client.request(method, path, **kwargs)


def _client(api_url: str, api_key: str | None, timeout: float = TRIGGER_TIMEOUT) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=api_url.rstrip("/"), headers=headers, timeout=timeout)


def reachable(api_url: str, *, api_key: str | None = None) -> bool:
    """Whether the Prefect API answers its health check."""
    try:
        with _client(api_url, api_key, HEALTH_TIMEOUT) as client:
            return client.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Deployment:
    """A deployment on the server, its work pool, and how many of the pool's workers are online
    (heartbeating): with none, a run of it waits in ``SCHEDULED`` until one starts."""

    id: str
    work_pool: str
    workers_online: int


def find_deployment(
    api_url: str, *, flow_name: str, deployment_name: str, api_key: str | None = None
) -> Deployment | None:
    """The deployment ``flow_name/deployment_name``, or ``None`` when the server has none."""
    with _client(api_url, api_key) as client:
        found = _request(client, "GET", f"/deployments/name/{flow_name}/{deployment_name}")
        if found.status_code == 404:
            return None
        found.raise_for_status()
        pool = found.json()["work_pool_name"]
        workers = _request(client, "POST", f"/work_pools/{pool}/workers/filter", json={})
        online = 0
        if workers.status_code != 404:
            workers.raise_for_status()
            online = sum(1 for worker in workers.json() if worker.get("status") == "ONLINE")
    return Deployment(id=found.json()["id"], work_pool=pool, workers_online=online)


@dataclass(frozen=True)
class SubmittedRun:
    """A flow run Prefect has accepted: its id and where to watch it."""

    flow_run_id: uuid.UUID
    name: str
    ui_url: str | None
    deployment: Deployment


def submit(
    api_url: str,
    *,
    flow_name: str,
    deployment_name: str,
    parameters: dict[str, Any],
    idempotency_key: str | None = None,
    api_key: str | None = None,
) -> SubmittedRun:
    """Create a flow run of ``flow_name/deployment_name`` and return at once."""
    deployment = find_deployment(
        api_url, flow_name=flow_name, deployment_name=deployment_name, api_key=api_key
    )
    if deployment is None:
        raise ConfigurationError(
            f"no deployment {flow_name}/{deployment_name} on {api_url}: run `make deploy`"
        )
    body: dict[str, Any] = {"parameters": parameters}
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    with _client(api_url, api_key) as client:
        created = _request(
            client, "POST", f"/deployments/{deployment.id}/create_flow_run", json=body
        )
        created.raise_for_status()
        run = created.json()
    ui_root = api_url.rstrip("/").removesuffix("/api")
    return SubmittedRun(
        flow_run_id=uuid.UUID(run["id"]),
        name=run["name"],
        ui_url=f"{ui_root}/runs/flow-run/{run['id']}",
        deployment=deployment,
    )
