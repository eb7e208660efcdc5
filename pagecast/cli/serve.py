"""``pagecast serve`` (the HTTP job API and the webhook receiver) and ``pagecast api-key``."""

from typing import Annotated

import typer
from rich.table import Table

from pagecast import apikeys, db
from pagecast.cli.common import (
    HostOption,
    JsonOption,
    PortOption,
    handles_errors,
    load_settings,
    print_json,
    stderr,
    stdout,
)

api_key_app = typer.Typer(help="Keys of the HTTP job API.", no_args_is_help=True)


@handles_errors
def serve(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8080,
) -> None:
    """Serve the HTTP job API at /v1 (and Meta's webhooks at /webhook when configured)."""
    from pagecast.server import create_server
    from pagecast.server import serve as run

    settings = load_settings()
    app = create_server(settings, db.get_engine(settings))
    db.ready_engine(settings)
    webhooks = " and /webhook" if settings.app_secret and settings.webhook_verify_token else ""
    stderr.print(f"pagecast on http://{host}:{port}: /v1 (schema: /v1/openapi.json){webhooks}")
    run(app, host=host, port=port)


@api_key_app.command("create")
@handles_errors
def api_key_create(
    name: Annotated[str, typer.Option(help="What the key is for (unique).")],
    page_id: Annotated[
        list[str] | None, typer.Option(help="Only this page's jobs (repeatable; default: all).")
    ] = None,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    with db.session_scope(db.ready_engine(load_settings())) as session:
        key, plaintext = apikeys.create_key(session, name=name, page_ids=page_id or [])
        pages = ", ".join(key.page_ids) or "every page"
    stderr.print(f"API key {key.name!r} ({pages}); shown once, keep it secret:")
    print(plaintext)


@api_key_app.command("revoke")
@handles_errors
def api_key_revoke(
    name: Annotated[str, typer.Argument(help="The key's name or key id.")],
) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    with db.session_scope(db.ready_engine(load_settings())) as session:
        key = apikeys.revoke_key(session, name_or_key_id=name)
    stderr.print(f"API key {key.name!r} revoked")


@api_key_app.command("list")
@handles_errors
def api_key_list(as_json: JsonOption = False) -> None:
    """The keys (never their secrets)."""
    with db.session_scope(db.ready_engine(load_settings())) as session:
        keys = [
            k.model_dump(mode="json", exclude={"key_hash", "id"})
            for k in apikeys.list_keys(session)
        ]
    if as_json:
        print_json(keys)
        return
    table = Table("name", "key id", "pages", "created", "last used", "revoked")
    for k in keys:
        table.add_row(
            k["name"],
            k["key_id"],
            ", ".join(k["page_ids"]) or "all",
            k["created_at"],
            k["last_used_at"] or "",
            k["revoked_at"] or "",
        )
    stdout.print(table)
