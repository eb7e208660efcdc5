"""``pagecast webhook``: the Messenger webhook receiver."""

import typer

from pagecast import db
from pagecast.cli.common import HostOption, PortOption, handles_errors, load_settings, stderr

webhook_app = typer.Typer(
    help="Messenger webhooks: receipts, replies, opt-outs.", no_args_is_help=True
)


@webhook_app.command("serve")
@handles_errors
def webhook_serve(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8080,
) -> None:
    """Receive Meta's webhook events at /webhook: delivery and read receipts, messages, opt-outs."""
    from pagecast.server import serve
    from pagecast.webhook_app import create_app

    settings = load_settings()
    app = create_app(settings, db.get_engine(settings))  # the secrets first, then the database
    db.ready_engine(settings)
    stderr.print(f"webhook receiver on http://{host}:{port}/webhook (stats: /webhook/stats)")
    serve(app, host=host, port=port)
