"""Prefect deployment tooling: work pool, concurrency limits, secrets, deployments."""
