"""`pagecast job test`: the job's message, rendered per test PSID, sent to those PSIDs only and
recorded in job_test_sends, never in the job."""

import json

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from pagecast.cli import app
from tests.engine import PAGE, admin_execute, create_job, job_row, recipient_counts

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _test_sends(engine) -> list[tuple]:
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT psid, status, text, error_key FROM job_test_sends ORDER BY psid")
        ).all()


@pytest.fixture
def sending(pagecast_env, sandbox, monkeypatch, tmp_path):
    """The CLI pointed at the sandbox with the page's token; the page knows contact 2001 by name."""
    url, state, ledger = sandbox
    monkeypatch.setenv("PAGECAST_GRAPH_API_URL", url)
    monkeypatch.setenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}", "test-token")
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("psid,first_name,last_name\n2001,Ana,Lee\n")
    assert _run("contacts", "import", contacts, "--page-id", PAGE).exit_code == 0
    return state, ledger


def test_a_test_send_reaches_only_the_test_psids_and_leaves_the_job_untouched(engine, sending):
    _, ledger = sending
    job = create_job(engine, 50, text="Hi {first_name}!")
    result = _run("job", "test", job.id, "--psid", "2001", "--psid", "2002", "--psid", "2001")
    assert result.exit_code == 0, result.output
    assert sorted((r["psid"], r["text"]) for r in ledger()) == [
        ("2001", "Hi Ana!"),
        ("2002", "Hi !"),
    ]
    assert _test_sends(engine) == [
        ("2001", "sent", "Hi Ana!", None),
        ("2002", "sent", "Hi !", None),
    ]
    after = job_row(engine, job.id)
    assert (after.status, after.sent, after.total) == ("pending", 0, 50)
    assert recipient_counts(engine, job.id) == {"pending": 50}


def test_a_failed_test_send_is_recorded_with_its_error(engine, sending):
    state, _ = sending
    state.config.fail_psids = {"2002": "551/1545041"}
    job = create_job(engine, 5)
    result = _run("job", "test", job.id, "--psid", "2001", "--psid", "2002", "--json")
    assert result.exit_code == 1
    outcomes = {s["psid"]: (s["status"], s["error_key"]) for s in json.loads(result.stdout)}
    assert outcomes == {"2001": ("sent", None), "2002": ("failed", "551/1545041")}
    assert [(p, s, k) for p, s, _, k in _test_sends(engine)] == [
        ("2001", "sent", None),
        ("2002", "failed", "551/1545041"),
    ]


@pytest.mark.parametrize("status", ["running", "completed", "cancelled"])
def test_only_a_pending_or_paused_job_is_test_sent(engine, database_url, sending, status):
    _, ledger = sending
    job = create_job(engine, 5)
    admin_execute(database_url, f"UPDATE send_jobs SET status = '{status}' WHERE id = '{job.id}'")
    result = _run("job", "test", job.id, "--psid", "2001")
    assert result.exit_code == 1
    assert f"is {status}: only a pending or paused job is test-sent" in result.output
    assert (ledger(), _test_sends(engine)) == ([], [])


@pytest.mark.parametrize(
    ("psids", "message"),
    [
        (["12a"], "not numeric"),
        ([str(3000 + i) for i in range(21)], "21 test PSIDs, the limit is 20"),
        (["9" * 21], "the limit is 20"),
    ],
)
def test_bad_test_psids_are_refused_before_anything_is_sent(engine, sending, psids, message):
    _, ledger = sending
    job = create_job(engine, 5)
    args = [a for psid in psids for a in ("--psid", psid)]
    result = _run("job", "test", job.id, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert (ledger(), _test_sends(engine)) == ([], [])


def test_without_a_token_nothing_is_sent(engine, sending, monkeypatch):
    _, ledger = sending
    monkeypatch.delenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}")
    monkeypatch.delenv("PAGECAST_PAGE_ACCESS_TOKEN", raising=False)
    job = create_job(engine, 5)
    result = _run("job", "test", job.id, "--psid", "2001")
    assert result.exit_code == 1
    assert f"no access token for page {PAGE}" in result.output
    assert (ledger(), _test_sends(engine)) == ([], [])


def test_a_paused_job_is_test_sent_as_its_recipients_would_be_addressed(
    engine, database_url, sending, tmp_path
):
    _, ledger = sending
    recipients = tmp_path / "r.csv"
    recipients.write_text("psid,first_name\n2001,Anna\n2003,Zoe\n")
    created = _run(
        "job", "create", "--page-id", PAGE, "--text", "Hi {first_name}!", "--recipients", recipients
    )  # fmt: skip
    job_id = created.stdout.strip()
    admin_execute(database_url, f"UPDATE send_jobs SET status = 'paused' WHERE id = '{job_id}'")
    result = _run("job", "test", job_id, "--psid", "2003", "--psid", "2001")
    assert result.exit_code == 0, result.output
    assert sorted(r["text"] for r in ledger()) == ["Hi Anna!", "Hi Zoe!"]  # the job's own names


def test_unknown_throttled_and_too_long_outcomes(engine, database_url, sending):
    state, ledger = sending
    state.config.fail_psids = {"2002": "613"}
    job = create_job(engine, 5, text="{first_name}" + "x" * 1988)  # 2,000 characters
    admin_execute(
        database_url, f"UPDATE contacts SET first_name = '{'A' * 30}' WHERE psid = '2001'"
    )
    result = _run("job", "test", job.id, "--psid", "2001", "--psid", "2002", "--json")
    assert result.exit_code == 1
    outcomes = {s["psid"]: (s["status"], s["error_key"]) for s in json.loads(result.stdout)}
    assert outcomes == {"2001": ("failed", "rendered_text_too_long"), "2002": ("failed", "613")}
    assert ledger() == []
    with engine.connect() as connection:
        factor = connection.execute(
            sa.text("SELECT backoff_factor FROM page_send_rates WHERE page_id = :page"),
            {"page": PAGE},
        ).scalar()
    assert factor < 1  # the throttle slowed the page down for every runner
    state.config.fail_psids = {}
    state.config.ambiguous_rate = 1.0
    result = _run("job", "test", job.id, "--psid", "2003", "--json")
    assert json.loads(result.stdout)[0]["status"] == "unknown"
