"""``pagecast demo``: a broadcast to a few thousand generated contacts through the local sandbox."""

import csv
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from pagecast import db, repo
from pagecast.audience import read_contacts
from pagecast.models import SendJob
from pagecast.sandbox import Sandbox, SandboxConfig, running_sandbox
from pagecast.validation import validate_message

DEMO_PAGE_ID = "100000000000001"
DEMO_TOKEN = "demo-page-token"
DEMO_TEXT = "Hi {first_name}! Our spring sale starts today: 20% off everything until Sunday."
_FIRST = (
    "Ana",
    "Ben",
    "Chloé",
    "Dmitri",
    "Eun-ji",
    "Farah",
    "Goran",
    "Hana",
    "Ivo",
    "Jae",
    "Kofi",
    "Lea",
)
_LAST = (
    "Silva",
    "Nguyen",
    "Okafor",
    "Müller",
    "Kowalski",
    "Haddad",
    "Tanaka",
    "Rossi",
    "Dubois",
    "Ali",
)


def write_contacts(path: Path, count: int, *, seed: int = 7) -> None:
    """A contacts CSV: everyone tagged ``customers``, some ``vip``, ~3 % opted out and ~4 % last
    seen more than 24 hours ago (skipped for UPDATE messages)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["psid", "first_name", "last_name", "tags", "opted_out", "last_interaction_at"]
        )
        for index in range(count):
            hours_ago = rng.uniform(25, 200) if rng.random() < 0.04 else rng.uniform(0.1, 20)
            tags = "customers;vip" if rng.random() < 0.2 else "customers"
            writer.writerow(
                [
                    str(7_000_000_000_000_000 + index),
                    rng.choice(_FIRST),
                    rng.choice(_LAST),
                    tags,
                    "yes" if rng.random() < 0.03 else "no",
                    (now - timedelta(hours=hours_ago)).isoformat(timespec="seconds"),
                ]
            )


@contextmanager
def demo_sandbox(home: Path) -> Iterator[tuple[str, Sandbox]]:
    """The sandbox with a little of everything: latency, jitter, transient and permanent faults."""
    config = SandboxConfig(
        latency_ms=40,
        jitter_ms=20,
        rate_limit_per_page=300,
        transient_rate=0.03,
        permanent_rate=0.015,
        ledger_path=home / "demo-ledger.jsonl",
    )
    with running_sandbox(config) as (url, sandbox):
        yield url, sandbox


def create_demo_job(engine: sa.Engine, home: Path, *, contacts: int) -> SendJob:
    """Import generated contacts and create a job for the ``customers`` tag."""
    path = home / "demo-contacts.csv"
    write_contacts(path, contacts)
    with db.session_scope(engine) as session:
        repo.import_contacts(session, page_id=DEMO_PAGE_ID, contacts=read_contacts(path))
        created = repo.create_job(
            session,
            request=repo.JobRequest(
                page_id=DEMO_PAGE_ID,
                message=validate_message(DEMO_TEXT, "UPDATE", None),
                audience=repo.TagFilter(("customers",)),
                concurrency=50,
                rate_per_second=150.0,
            ),
        )
    return created.job


def point_at_sandbox(url: str) -> None:
    """Make this process and the flow it starts talk to the sandbox with the demo token."""
    os.environ["PAGECAST_GRAPH_API_URL"] = url
    os.environ[f"PAGECAST_PAGE_ACCESS_TOKEN__{DEMO_PAGE_ID}"] = DEMO_TOKEN
