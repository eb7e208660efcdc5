"""Starting pagecast deployments over Prefect's REST API, without waiting for them.

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


@dataclass(frozen=True)
class SubmittedRun:
    """A flow run Prefect has accepted: its id and where to watch it."""

    flow_run_id: uuid.UUID
    name: str
    ui_url: str | None


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
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(
        base_url=api_url.rstrip("/"), headers=headers, timeout=TRIGGER_TIMEOUT
    ) as client:
        found = client.get(f"/deployments/name/{flow_name}/{deployment_name}")
        if found.status_code == 404:
            raise ConfigurationError(
                f"no deployment {flow_name}/{deployment_name} on {api_url}: run `make deploy`"
            )
        found.raise_for_status()
        body: dict[str, Any] = {"parameters": parameters}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        created = _request(
            client, "POST", f"/deployments/{found.json()['id']}/create_flow_run", json=body
        )
        created.raise_for_status()
        run = created.json()
    ui_root = api_url.rstrip("/").removesuffix("/api")
    return SubmittedRun(
        flow_run_id=uuid.UUID(run["id"]),
        name=run["name"],
        ui_url=f"{ui_root}/runs/flow-run/{run['id']}",
    )
