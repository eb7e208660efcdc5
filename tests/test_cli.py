import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from pagecast.cli import app

PAGE = "100200300"
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _jobs():
    result = _run("job", "list", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _command_paths(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for command in group.registered_commands:
        paths.append((*prefix, command.name or command.callback.__name__.replace("_", "-")))
    for sub in group.registered_groups:
        paths += _command_paths(sub.typer_instance, (*prefix, sub.name))
    return paths


@pytest.mark.parametrize("path", _command_paths(app), ids=" ".join)
def test_every_command_explains_itself(path):
    result = _run(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.fixture
def recipients(tmp_path):
    path = tmp_path / "recipients.txt"
    path.write_text("1001\n1002\n1003\n1002\n")
    return path


def test_create_prints_the_job_id_and_status_reports_it(pagecast_env, recipients):
    result = _run(
        "job", "create", "--page-id", PAGE, "--text", "Hi {first_name}", "--recipients", recipients
    )
    assert result.exit_code == 0, result.stderr
    job_id = result.stdout.strip()
    assert "1 duplicate PSIDs removed" in result.stderr
    status = json.loads(_run("job", "status", job_id, "--json").stdout)
    assert status["id"] == job_id
    assert (status["total"], status["pending"], status["status"]) == (3, 3, "pending")
    assert status["source"] == "file:recipients.txt"
    human = _run("job", "status", job_id)
    assert human.exit_code == 0 and "pending" in human.stdout


def test_one_hundred_thousand_recipients(pagecast_env, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{10**15 + i}\n" for i in range(100_000)))
    result = _run(
        "job", "create", "--page-id", PAGE, "--text", "Sale!", "--recipients", path, "--json"
    )
    assert result.exit_code == 0, result.stderr
    job_id = json.loads(result.stdout)["id"]
    status = json.loads(_run("job", "status", job_id, "--json").stdout)
    assert (status["total"], status["pending"]) == (100_000, 100_000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "hi", "--messaging-type", "PROMO"], "messaging_type: 'PROMO'"),
        (["--text", "hi", "--messaging-type", "MESSAGE_TAG", "--tag", "SALE"], "tag: 'SALE'"),
        (["--text", "Hi {nickname}"], "unknown placeholder {nickname}"),
        (["--text", "Hi {first_name:d}"], "placeholder {first_name:d} has a format"),
        (["--text", "Hi {first_name!r}"], "placeholder {first_name!r} has a format"),
        (["--text", "hi", "--rate", "50"], "rate: must be above 0 and at most 40"),
    ],
)
def test_invalid_requests_exit_2_and_write_nothing(pagecast_env, recipients, args, message):
    result = _run("job", "create", "--page-id", PAGE, "--recipients", recipients, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert _jobs() == []


def test_missing_file_and_missing_audience(pagecast_env, tmp_path):
    missing = _run(
        "job", "create", "--page-id", PAGE, "--text", "hi", "--recipients", tmp_path / "x.txt"
    )
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    neither = _run("job", "create", "--page-id", PAGE, "--text", "hi")
    assert neither.exit_code == 2 and "exactly one of --recipients" in neither.stderr
    assert _jobs() == []


def test_idempotency_key_returns_the_same_job(pagecast_env, recipients):
    args = ["job", "create", "--page-id", PAGE, "--text", "hi", "--recipients", recipients]
    first = _run(*args, "--idempotency-key", "k1")
    second = _run(*args, "--idempotency-key", "k1")
    assert first.stdout == second.stdout
    assert "already exists" in second.stderr
    conflict = _run(
        *args[:-4], "--text", "other", "--recipients", recipients, "--idempotency-key", "k1"
    )
    assert conflict.exit_code == 1 and "different text" in conflict.stderr
    assert len(_jobs()) == 1


def test_contacts_import_and_tag_filter(pagecast_env, tmp_path):
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(
        "psid,first_name,tags,opted_out\n1,Ana,vip,no\n2,Bo,vip;promo,no\n3,Cy,vip,yes\n"
    )
    imported = _run("contacts", "import", contacts, "--page-id", PAGE, "--json")
    assert json.loads(imported.stdout) == {"inserted": 3, "updated": 0}
    created = _run(
        "job",
        "create",
        "--page-id",
        PAGE,
        "--text",
        "Hi {first_name}",
        "--tag-filter",
        "vip",
        "--messaging-type",
        "MESSAGE_TAG",
        "--tag",
        "ACCOUNT_UPDATE",
        "--json",
    )
    job = json.loads(created.stdout)
    assert (job["total"], job["messaging_type"], job["tag"]) == (2, "MESSAGE_TAG", "ACCOUNT_UPDATE")
    nobody = _run("job", "create", "--page-id", PAGE, "--text", "hi", "--tag-filter", "gold")
    assert nobody.exit_code == 2 and "no contact" in nobody.stderr


def test_status_of_unknown_or_malformed_job(pagecast_env):
    unknown = _run("job", "status", "00000000-0000-0000-0000-000000000000")
    assert (
        unknown.exit_code == 1
        and "error: no job 00000000-0000-0000-0000-000000000000" in unknown.stderr
    )
    malformed = _run("job", "status", "nope")
    assert malformed.exit_code == 2 and "job_id: 'nope' is not a UUID" in malformed.stderr


@pytest.mark.parametrize(
    "command", ["run", "status", "cancel", "pause", "resume", "retry", "submit"]
)
def test_commands_on_an_unknown_job_start_nothing(pagecast_env, tmp_path, monkeypatch, command):
    monkeypatch.setenv("PAGECAST_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # submit must not get there
    job_id = "6f1c2a9e-0000-4000-8000-000000000001"
    result = _run("job", command, job_id)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no job {job_id}"
    assert not (tmp_path / "logs").exists()  # no flow process was started


def test_commands_that_do_not_fit_the_jobs_state_say_so(pagecast_env, recipients, tmp_path):
    job_id = _run(
        "job", "create", "--page-id", PAGE, "--text", "hi", "--recipients", recipients
    ).stdout.strip()
    resume = _run("job", "resume", job_id)
    assert resume.exit_code == 1
    assert f"job {job_id} is pending: only a paused job can be resumed" in resume.stderr
    retry = _run("job", "retry", job_id)
    assert retry.exit_code == 1 and "only ended or paused jobs can be retried" in retry.stderr
    assert _run("job", "cancel", job_id).exit_code == 0
    again = _run("job", "cancel", job_id)
    assert again.exit_code == 1
    assert f"job {job_id} is cancelled: it has ended and cannot be cancelled" in again.stderr
    run = _run("job", "run", job_id)
    assert run.exit_code == 1 and "it was cancelled" in run.stderr
    assert _jobs()[0]["status"] == "cancelled"


def test_db_commands(pagecast_env):
    assert _run("db", "upgrade").exit_code == 0
    sql = _run("db", "sql")
    assert sql.exit_code == 0 and "CREATE TABLE send_jobs" in sql.stdout


def test_bad_database_url_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("PAGECAST_DATABASE_URL", "mysql://x")
    result = _run("job", "list")
    assert result.exit_code == 1
    assert "PAGECAST_DATABASE_URL" in result.stderr


def test_embedded_database_is_started_reused_and_stopped(tmp_path, recipients):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGECAST_")}
    env["PAGECAST_HOME"] = str(tmp_path / "home")

    def pagecast(*args):
        return subprocess.run(
            [sys.executable, "-m", "pagecast", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    job_id = pagecast(
        "job", "create", "--page-id", PAGE, "--text", "hi", "--recipients", recipients
    ).stdout.strip()
    status = json.loads(pagecast("job", "status", job_id, "--json").stdout)
    assert status["total"] == 3
    assert (tmp_path / "home" / "pgdata" / "PG_VERSION").exists()
    assert not (tmp_path / "home" / "pgdata" / "postmaster.pid").exists()
