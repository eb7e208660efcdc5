"""Test fixtures: one real PostgreSQL per session (embedded unless ``PAGECAST_TEST_DATABASE_URL``
names a server), one migrated template database, and a fresh clone of it for every test; a
PostgreSQL for running stacks' Prefect databases; one Prefect test harness."""

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import Session

from deployments.local_stack import (
    embedded_prefect_server_url,
    has_pg_trgm,
    stop_embedded_prefect_server,
)
from pagecast import db
from pagecast.sandbox import Sandbox, SandboxConfig, running_sandbox
from pagecast.settings import normalize_database_url
from tests.engine import admin_execute

# The modules that drive the session's one running stack, in order (the last kills its worker).
# Under ``pytest -n`` one worker runs them all (``pytest_xdist_make_scheduler``).
STACK_MODULES = ("test_operations.py", "test_stack_recovery.py")
# Then the modules that time the page's schedule against the wall clock, then the slowest, so that
# no worker is left with a long module at the end.
FIRST_MODULES = (
    *STACK_MODULES,
    "test_ratelimit.py",
    "test_engine.py",
    "test_send_api_faults.py",
    "test_crash_matrix.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return FIRST_MODULES.index(name) if name in FIRST_MODULES else len(FIRST_MODULES)

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``pytest -n`` (``--dist load``, its default): a module at a time per worker, and the
    stack modules as one unit, in collection order. (xdist's ``loadgroup`` would say so with
    markers, but it cannot rename pytest 9.2's node ids.) Another ``--dist`` is left as asked."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "stack" if Path(module).name in STACK_MODULES else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """An administrative URL of the session's PostgreSQL server.

    The embedded server's data lives outside pytest's temporary root: every pytest session that
    starts makes that root private again, which would lock the server's own user out of it."""
    external = os.environ.get("PAGECAST_TEST_DATABASE_URL")
    if external:
        yield normalize_database_url(external)
        return
    home = Path(tempfile.mkdtemp(prefix="pagecast-test-db-"))
    yield db.embedded_database_url(home)
    db.stop_embedded_database(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server_url(server_url: str) -> Iterator[str]:
    """A PostgreSQL server with ``pg_trgm`` for running stacks' Prefect databases: the session's
    server when it has the extension, else an embedded one of Prefect's own, as ``make up`` runs."""
    if has_pg_trgm(server_url):
        yield server_url
        return
    home = Path(tempfile.mkdtemp(prefix="pagecast-test-prefect-db-"))
    yield embedded_prefect_server_url(home / "pgdata")
    stop_embedded_prefect_server(home / "pgdata")
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated to head, cloned by every test."""
    name = f"pagecast_template_{uuid.uuid4().hex[:8]}"
    admin_execute(server_url, f"CREATE DATABASE {name}")
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    db.upgrade(engine)
    engine.dispose()
    yield name
    admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"pagecast_test_{uuid.uuid4().hex[:12]}"
    admin_execute(server_url, f"CREATE DATABASE {name} TEMPLATE {template_database}")
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    db.engine_for(url).dispose()
    admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def fresh_database(server_url: str, template_database: str) -> Iterator[Callable[[], str]]:
    """Make more fresh, migrated databases in one test (each isolated case its own)."""
    names: list[str] = []

    def make() -> str:
        name = f"pagecast_test_{uuid.uuid4().hex[:12]}"
        admin_execute(server_url, f"CREATE DATABASE {name} TEMPLATE {template_database}")
        names.append(name)
        return make_url(server_url).set(database=name).render_as_string(hide_password=False)

    yield make
    for name in names:
        admin_execute(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def engine(database_url: str) -> sa.Engine:
    return db.engine_for(database_url)


@pytest.fixture
def session(engine: sa.Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def pagecast_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the CLI (and anything reading ``Settings``) at the test database."""
    monkeypatch.setenv("PAGECAST_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[str, Sandbox, Callable[[], list[dict]]]]:
    """A Send API sandbox with a ledger: its URL, its state, and a function reading the ledger."""
    path = tmp_path / "ledger.jsonl"
    with running_sandbox(SandboxConfig(ledger_path=path, seed=3)) as (url, state):

        def ledger() -> list[dict]:
            state.stats()  # flushes the ledger file
            return [json.loads(line) for line in path.read_text().splitlines()]

        yield url, state, ledger


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """The session's one Prefect test server (entering it takes ~12 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory, server_url, template_database, prefect_server_url):
    """The session's one running stack, started when a module first asks for it."""
    from tests.stack import SharedStack, running_stack

    home = tmp_path_factory.mktemp("ops-home")
    shared = SharedStack(
        lambda: running_stack(home, server_url, template_database, prefect_server_url)
    )
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def ops(request: pytest.FixtureRequest, shared_stack):
    """The running stack (Prefect server, process worker, bootstrap) the ``STACK_MODULES`` share;
    the last of them stops it when it ends, so it takes no CPU from the modules after it."""
    yield shared_stack.get()
    if request.path.name == STACK_MODULES[-1]:
        shared_stack.close()
