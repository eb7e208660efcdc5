"""The ``pagecast`` command line: database, contacts, jobs, webhooks and the Send API sandbox.

Every read has ``--json``. Errors print one clear message to stderr and exit non-zero:
2 for rejected input (nothing written), 1 for any other pagecast error.
"""

import typer

from pagecast.cli.admin import contacts_app, db_app, demo, sandbox_app
from pagecast.cli.jobs import job_app
from pagecast.cli.serve import api_key_app, serve
from pagecast.cli.sweep import sweep
from pagecast.cli.webhook import webhook_app

app = typer.Typer(help="Durable, rate-limited Messenger broadcasts.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(contacts_app, name="contacts")
app.add_typer(job_app, name="job")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(webhook_app, name="webhook")
app.add_typer(api_key_app, name="api-key")
app.command("serve")(serve)
app.command("demo")(demo)
app.command("sweep")(sweep)
