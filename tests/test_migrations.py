import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from pagecast import db


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_models_and_migrations_agree(engine):
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == []


def test_upgrade_downgrade_upgrade(engine):
    expected = {"send_jobs", "send_job_recipients", "contacts", "alembic_version"}
    assert expected <= _tables(engine)
    db.downgrade(engine, "base")
    assert _tables(engine) == {"alembic_version"}
    db.upgrade(engine)
    assert expected <= _tables(engine)
    db.ensure_schema_current(engine)


def test_schema_check_names_the_fix(engine):
    db.downgrade(engine, "base")
    try:
        db.ensure_schema_current(engine)
    except db.ConfigurationError as exc:
        assert "pagecast db upgrade" in str(exc)
    else:
        raise AssertionError("an unmigrated database passed the schema check")


def test_migration_sql_needs_no_database():
    sql = db.migration_sql()
    assert "CREATE TABLE send_jobs" in sql
    assert "CREATE TABLE send_job_recipients" in sql
    assert "gen_random_uuid()" in sql
    assert "COMMIT" in sql
