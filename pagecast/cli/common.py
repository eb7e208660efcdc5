"""Shared pieces of the command line: consoles, error handling, settings, JSON output."""

import functools
import json
import sys
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import pydantic
import typer
from rich.console import Console

from pagecast.errors import ConfigurationError, InvalidInput, PagecastError
from pagecast.models import SendJob
from pagecast.settings import Settings
from pagecast.text import text_length

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
HostOption = Annotated[
    str, typer.Option(help="Address to listen on (behind a TLS reverse proxy in production).")
]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")]


def handles_errors(command: F) -> F:
    """Print a pagecast error as one line and exit 2 (rejected input) or 1 (anything else)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PagecastError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2 if isinstance(exc, InvalidInput) else 1) from None

    return wrapper  # type: ignore[return-value]


def parse_job_id(job_id: str) -> uuid.UUID:
    """The job id given on the command line; ``InvalidInput`` unless it is a UUID."""
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise InvalidInput(f"job_id: {job_id!r} is not a UUID") from None


def load_settings() -> Settings:
    """The settings from the environment; a bad value is a ``ConfigurationError``."""
    try:
        return Settings()
    except pydantic.ValidationError as exc:
        raise ConfigurationError(
            "; ".join(
                f"PAGECAST_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
            )
        ) from None


def job_dict(job: SendJob) -> dict[str, Any]:
    """A job as ``--json`` prints it: every column but the text, which gives its length."""
    length = text_length(job.text) if job.text is not None else 0
    return job.model_dump(mode="json", exclude={"text"}) | {"text_length": length}


def print_json(value: Any) -> None:
    """Write ``value`` as indented JSON to stdout (never through rich, which would style it)."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
