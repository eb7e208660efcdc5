"""`pagecast job create --dry-run`: the counts creating the job would give, a rendered sample and
the ETA behind the page's queued work — with nothing written."""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from pagecast.cli import app
from tests.engine import PAGE, admin_execute, create_job

runner = CliRunner()
TABLES = ("send_jobs", "send_job_recipients", "contacts")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _row_counts(engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            t: connection.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES
        }


def _preview(*args) -> dict:
    result = _run("job", "create", "--page-id", PAGE, "--dry-run", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def audience(tmp_path, pagecast_env):
    """Contacts of the page (one opted out, one outside the 24-hour window) and a recipients file
    naming them, a stranger and a duplicate."""
    stale = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    fresh = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(
        "psid,first_name,last_name,opted_out,last_interaction_at\n"
        f"1001,Ana,Lee,no,{fresh}\n1002,Ben,Roe,no,{stale}\n1003,Cy,Poe,yes,{fresh}\n"
    )
    assert _run("contacts", "import", contacts, "--page-id", PAGE).exit_code == 0
    recipients = tmp_path / "recipients.txt"
    recipients.write_text("1001\n1002\n1003\n1004\n1001\n")
    return recipients


def test_a_dry_run_counts_what_creating_would_and_writes_nothing(engine, audience):
    before = _row_counts(engine)
    preview = _preview("--text", "Hi {first_name}", "--recipients", audience, "--rate", "10")
    assert _row_counts(engine) == before
    assert {k: preview[k] for k in ("recipients", "duplicates_removed", "opted_out_excluded")} == {
        "recipients": 3,
        "duplicates_removed": 1,
        "opted_out_excluded": 1,
    }
    assert (preview["outside_window"], preview["to_send"]) == (1, 2)
    assert preview["samples"] == [
        {"psid": "1001", "text": "Hi Ana"},
        {"psid": "1002", "text": "Hi Ben"},
        {"psid": "1004", "text": "Hi "},
    ]
    assert preview["existing_job_id"] is None
    assert preview["eta_seconds"] == pytest.approx(2 / 10 / 0.97, abs=1e-3)


def test_a_tagged_message_is_not_held_to_the_window(engine, audience):
    preview = _preview(
        "--text", "Hi", "--recipients", audience,
        "--messaging-type", "MESSAGE_TAG", "--tag", "ACCOUNT_UPDATE",
    )  # fmt: skip
    assert (preview["outside_window"], preview["to_send"]) == (0, 3)


def test_the_eta_counts_the_work_due_on_the_page_before_it_at_each_jobs_rate(engine, audience):
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    create_job(engine, 300, rate=30.0)  # due now: 10 s of the page's schedule
    create_job(engine, 100, rate=1.0, scheduled_at=tomorrow)  # starts after the new job
    create_job(engine, 500, rate=5.0, page_id="999")  # another page
    preview = _preview("--text", "Hi", "--recipients", audience, "--rate", "2")
    assert (preview["jobs_ahead"], preview["recipients_ahead"]) == (1, 300)
    assert preview["eta_seconds"] == pytest.approx((10 + 2 / 2) / 0.97, abs=0.1)


def test_a_later_start_waits_for_itself_not_for_work_done_by_then(engine, audience):
    create_job(engine, 300, rate=30.0)
    scheduled = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    preview = _preview(
        "--text", "Hi", "--recipients", audience, "--rate", "2",
        "--scheduled-at", scheduled.isoformat(),
    )  # fmt: skip
    assert datetime.fromisoformat(preview["starts_at"]) == scheduled
    finishes_at = datetime.fromisoformat(preview["finishes_at"])
    assert (finishes_at - scheduled).total_seconds() == pytest.approx(2 / 2 / 0.97)


def test_a_used_idempotency_key_previews_what_is_left_of_its_job(engine, audience, pagecast_env):
    created = _run(
        "job", "create", "--page-id", PAGE, "--text", "Hi", "--recipients", audience,
        "--idempotency-key", "spring-sale",
    )  # fmt: skip
    job_id = created.stdout.strip()
    preview = _preview("--text", "Hi", "--recipients", audience, "--idempotency-key", "spring-sale")
    assert (preview["existing_job_id"], preview["to_send"]) == (job_id, 2)
    admin_execute(
        pagecast_env,
        f"UPDATE send_job_recipients SET status = 'sent' WHERE job_id = '{job_id}'; "
        f"UPDATE send_jobs SET status = 'completed', sent = 3 WHERE id = '{job_id}'",
    )
    before = _row_counts(engine)
    preview = _preview("--text", "Hi", "--recipients", audience, "--idempotency-key", "spring-sale")
    assert (preview["existing_job_id"], preview["to_send"]) == (job_id, 0)
    assert _row_counts(engine) == before


def test_a_bad_dry_run_fails_like_a_bad_create(engine, audience):
    before = _row_counts(engine)
    result = _run(
        "job", "create", "--page-id", PAGE, "--dry-run", "--text", "x" * 2001,
        "--recipients", audience,
    )  # fmt: skip
    assert result.exit_code != 0
    assert "2,000" in result.output or "2000" in result.output
    assert _row_counts(engine) == before


def test_the_dry_run_prints_a_readable_preview(audience):
    result = _run(
        "job", "create", "--page-id", PAGE, "--dry-run", "--text", "Hi {first_name}",
        "--recipients", audience,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for line in ("nothing written, nothing sent", "1 would be skipped", "ETA", "1001: Hi Ana"):
        assert line in result.stdout


def test_a_dry_run_counts_invalid_psids_that_creating_would_refuse(engine, audience, tmp_path):
    with_bad = tmp_path / "with-bad.txt"
    with_bad.write_text("1001\nabc\n1004\n0123\n")
    before = _row_counts(engine)
    preview = _preview("--text", "Hi", "--recipients", with_bad)
    assert (preview["invalid"], preview["recipients"]) == (2, 2)
    assert preview["invalid_lines"] == [
        "line 2: PSID 'abc' is not numeric (digits 0-9 only)",
        "line 4: PSID '0123' starts with 0, which Meta's PSIDs never do",
    ]
    table = _run(
        "job", "create", "--page-id", PAGE, "--dry-run", "--text", "Hi", "--recipients", with_bad
    )
    assert "invalid PSIDs" in table.stdout and "2 left out" in table.stdout
    refused = runner.invoke(
        app, ["job", "create", "--page-id", PAGE, "--text", "Hi", "--recipients", str(with_bad)]
    )
    assert refused.exit_code == 2 and "2 invalid PSID(s)" in refused.stderr
    assert _row_counts(engine) == before


def test_the_eta_counts_what_a_throttled_page_still_has_to_recover(engine, audience):
    calm = _preview("--text", "Hi", "--recipients", audience, "--rate", "10")["eta_seconds"]
    throttled_at = time.monotonic()
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO page_send_rates (page_id, backoff_factor, throttled_at) "
                "VALUES (:page, 0.5, now())"
            ),
            {"page": PAGE},
        )
    throttled = _preview("--text", "Hi", "--recipients", audience, "--rate", "10")["eta_seconds"]
    recovered = 0.05 * (time.monotonic() - throttled_at)  # the factor's rise since the throttle

    def lost(factor: float) -> float:  # the seconds a linear recovery to 1 costs at this rate
        return (1 - factor) ** 2 / (2 * 0.05)

    assert lost(0.5 + recovered) - 0.1 <= throttled - calm <= lost(0.5) + 0.1  # ~2.5 s
