import pytest

from pagecast.settings import Settings, normalize_database_url


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@db.example:5432/app",
        "postgresql://u:p@db.example:5432/app",
        "postgresql+psycopg://u:p@db.example:5432/app",
    ],
)
def test_accepts_every_postgres_dsn_form(url):
    assert normalize_database_url(url) == "postgresql+psycopg://u:p@db.example:5432/app"


def test_rejects_other_schemes():
    with pytest.raises(ValueError, match="PAGECAST_DATABASE_URL"):
        normalize_database_url("sqlite:///x.db")


def test_defaults(monkeypatch):
    for name in ("DATABASE_URL", "HOME", "GRAPH_API_URL", "GRAPH_API_VERSION", "LEASE_SECONDS"):
        monkeypatch.delenv(f"PAGECAST_{name}", raising=False)
    settings = Settings()
    assert settings.database_url is None
    assert str(settings.home) == ".pagecast"
    assert settings.graph_api_url == "https://graph.facebook.com"
    assert settings.graph_api_version == "v25.0"
    assert settings.lease_seconds == 120
    assert settings.chunk_size == 200


def test_reads_environment(monkeypatch):
    monkeypatch.setenv("PAGECAST_DATABASE_URL", "postgres://a@h/d")
    monkeypatch.setenv("PAGECAST_GRAPH_API_URL", "http://127.0.0.1:8765/")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://a@h/d"
    assert settings.graph_api_url == "http://127.0.0.1:8765"
