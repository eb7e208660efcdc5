"""``pagecast demo``: a broadcast to a few thousand generated contacts through the local sandbox,
with delivery and read receipts coming back through the webhook receiver."""

import csv
import os
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from pydantic import SecretStr

from pagecast import db, repo, webhooks
from pagecast.audience import read_contacts
from pagecast.models import SendJob
from pagecast.sandbox import Sandbox, SandboxConfig, running_sandbox
from pagecast.server import running_receiver
from pagecast.settings import Settings
from pagecast.validation import validate_message

DEMO_PAGE_ID = "100000000000001"
DEMO_TOKEN = "demo-page-token"
_RECEIPTS_WAIT_SECONDS = 10.0
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
def demo_receipts(settings: Settings, engine: sa.Engine, sandbox: Sandbox) -> Iterator[None]:
    """The webhook receiver in this process, with the sandbox posting it receipts: most messages
    delivered, about half read, some receipts twice, late and out of order."""
    secret = "demo-app-secret"
    receiver_settings = settings.model_copy(
        update={"app_secret": SecretStr(secret), "webhook_verify_token": SecretStr("demo")}
    )
    with running_receiver(receiver_settings, engine) as (url, _):
        sandbox.config.update(
            {
                "webhook_url": url,
                "webhook_secret": secret,
                "delivery_receipt_rate": 0.97,
                "read_receipt_rate": 0.55,
                "receipt_delay_ms": 1500,
            }
        )
        yield


def settle_receipts(engine: sa.Engine, sandbox: Sandbox, job_id: uuid.UUID) -> SendJob:
    """The job once the sandbox has posted its receipts and the receiver applied them (or after
    ``_RECEIPTS_WAIT_SECONDS``)."""
    webhooks.settled(
        engine, timeout=_RECEIPTS_WAIT_SECONDS, waiting_elsewhere=lambda: sandbox.receipts.waiting
    )
    with db.session_scope(engine) as session:
        return repo.get_job(session, job_id=job_id)


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
