"""Commands around the jobs: database schema, contacts, the sandbox, the demo."""

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pagecast import db, repo
from pagecast.audience import read_contacts
from pagecast.cli.common import JsonOption, handles_errors, load_settings, print_json, stderr
from pagecast.cli.jobs import run_and_watch
from pagecast.errors import ConfigurationError
from pagecast.reports import receipt_share
from pagecast.sandbox import SandboxConfig, serve
from pagecast.validation import validate_page_id

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
contacts_app = typer.Typer(help="A page's contacts.", no_args_is_help=True)
sandbox_app = typer.Typer(help="The local Send API sandbox.", no_args_is_help=True)


@db_app.command("upgrade")
@handles_errors
def db_upgrade() -> None:
    """Apply pending migrations to the configured database."""
    db.upgrade(db.get_engine(load_settings()))
    stderr.print("database schema is up to date")


@db_app.command("sql")
@handles_errors
def db_sql(
    from_revision: Annotated[
        str | None, typer.Option("--from", help="Only migrations after this revision.")
    ] = None,
) -> None:
    """Print the migration SQL, to apply by hand (e.g. in Supabase's SQL editor)."""
    sys.stdout.write(db.migration_sql(from_revision))


@contacts_app.command("import")
@handles_errors
def contacts_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with psid[,first_name,last_name,tags,opted_out,last_interaction_at]."
        ),
    ],
    page_id: Annotated[str, typer.Option(help="The Facebook Page the contacts belong to.")],
    as_json: JsonOption = False,
) -> None:
    """Insert or update a page's contacts from a file."""
    page_id = validate_page_id(page_id)
    contacts = read_contacts(file)
    with db.session_scope(db.ready_engine(load_settings())) as session:
        result = repo.import_contacts(session, page_id=page_id, contacts=contacts)
    if as_json:
        print_json({"inserted": result.inserted, "updated": result.updated})
    else:
        stderr.print(
            f"{result.inserted} contacts added, {result.updated} updated for page {page_id}"
        )


@handles_errors
def demo(
    contacts: Annotated[
        int, typer.Option(min=10, max=100_000, help="How many contacts to generate.")
    ] = 2400,
) -> None:
    """Broadcast to generated contacts through the local sandbox, with a progress bar and a summary."""
    from pagecast import demo as demo_kit

    settings = load_settings()
    home = settings.home.expanduser().resolve()
    engine = db.ready_engine(settings)
    with (
        demo_kit.demo_sandbox(home) as (url, sandbox),
        demo_kit.demo_receipts(settings, engine, sandbox),
    ):
        demo_kit.point_at_sandbox(url)
        job = demo_kit.create_demo_job(engine, home, contacts=contacts)
        stderr.print(
            f"sandbox on {url}; job {job.id}: {job.total} of {contacts} contacts "
            f"(opted-out ones excluded), {job.rate_per_second:g} msg/s, concurrency {job.concurrency}"
        )
        try:
            run_and_watch(settings, job.id)
        finally:
            stats = sandbox.stats()
            stderr.print(
                f"sandbox ledger: {stats['delivered']} delivered, {stats['duplicates']} duplicates, "
                f"faults injected: {stats['errors']}"
            )
            ended = demo_kit.settle_receipts(engine, sandbox, job.id)
            stderr.print(
                f"webhook receipts: {ended.delivered} delivered "
                f"({receipt_share(ended.delivered, ended)}), "
                f"{ended.read} read ({receipt_share(ended.read, ended)})"
            )


@sandbox_app.command("serve")
@handles_errors
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Loopback address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    latency_ms: Annotated[float, typer.Option(help="Added latency per request.")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(help="Latency varies by ± this much.")] = 0.0,
    rate_limit: Annotated[
        int | None, typer.Option(help="Calls per second per page before code 613.")
    ] = None,
    transient_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of calls failing with HTTP 500 (codes 1/2).")
    ] = 0.0,
    permanent_rate: Annotated[
        float,
        typer.Option(min=0, max=1, help="Share of PSIDs that always fail (551, 100/2018001)."),
    ] = 0.0,
    outside_window_rate: Annotated[
        float,
        typer.Option(min=0, max=1, help="Share of PSIDs outside the 24 h window (10/2018278)."),
    ] = 0.0,
    ambiguous_rate: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="Share of calls delivered, then dropped without a response."
        ),
    ] = 0.0,
    revoke_after: Annotated[
        int | None, typer.Option(help="Revoke the token after this many deliveries (code 190).")
    ] = None,
    fail_psid: Annotated[
        list[str] | None, typer.Option(help="PSID=CODE\\[/SUBCODE] to fail always (repeatable).")
    ] = None,
    token: Annotated[
        list[str] | None, typer.Option(help="Accept only these tokens (repeatable; default: any).")
    ] = None,
    ledger: Annotated[
        Path | None, typer.Option(help="Append every delivery to this JSONL file.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible random faults.")] = None,
    usage_percent: Annotated[
        float | None, typer.Option(help="Report this page usage % in X-Page-Usage headers.")
    ] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            help="Post delivery and read receipts here, signed with PAGECAST_APP_SECRET "
            "(e.g. http://127.0.0.1:8080/webhook)."
        ),
    ] = None,
    read_receipt_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of delivered messages also read.")
    ] = 0.5,
) -> None:
    """Run the Messenger Send API sandbox in the foreground."""
    fail_psids = dict(entry.split("=", 1) for entry in fail_psid or [] if "=" in entry)
    config = SandboxConfig(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        rate_limit_per_page=rate_limit,
        transient_rate=transient_rate,
        permanent_rate=permanent_rate,
        outside_window_rate=outside_window_rate,
        ambiguous_rate=ambiguous_rate,
        revoke_after=revoke_after,
        fail_psids=fail_psids,
        valid_tokens=list(token or []),
        ledger_path=ledger,
        seed=seed,
        usage_percent=usage_percent,
        webhook_url=webhook_url,
        webhook_secret=os.environ.get("PAGECAST_APP_SECRET"),
        read_receipt_rate=read_receipt_rate,
    )
    if webhook_url and not config.webhook_secret:
        raise ConfigurationError("--webhook-url needs PAGECAST_APP_SECRET to sign the receipts")
    stderr.print(f"Send API sandbox on http://{host}:{port} (GET /__stats for counters)")
    serve(config, host=host, port=port)
