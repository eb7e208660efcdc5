"""``pagecast sweep``: recovery without a Prefect scheduler (system cron, a Kubernetes CronJob, a
container's entrypoint)."""

import asyncio
from typing import Annotated

import typer

from pagecast.cli.common import handles_errors, load_settings
from pagecast.dispatch import Sweeper
from pagecast.errors import InvalidInput


def _say(line: str) -> None:
    print(line, flush=True)


@handles_errors
def sweep(
    once: Annotated[bool, typer.Option("--once", help="Sweep once (the default).")] = False,
    every: Annotated[
        float | None,
        typer.Option(min=1, help="Sweep every SECONDS until stopped, instead of once."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Jobs per sweep.")] = 100,
) -> None:
    """Settle dead runners' jobs, then start every due or abandoned job: through the send-job
    deployment when Prefect is reachable with a worker online, else in this process. One line
    per job."""
    if once and every is not None:
        raise InvalidInput("--once and --every: give one of them")
    sweeper = Sweeper(load_settings(), _say, limit=limit)
    asyncio.run(sweeper.forever(every) if every is not None else sweeper.once())
