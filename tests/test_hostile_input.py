"""Hostile and bad input (issue 10): one table per way in — the CLI, the Python API (the
validation the broadcast deployment runs, then ``repo.create_job``) and the job commands. A
rejected case names the field and the limit, exits non-zero on the CLI, writes no row and sends
nothing; an accepted one stores its values verbatim."""

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session
from typer.testing import CliRunner

from pagecast import db, lifecycle, repo
from pagecast.cli import app
from pagecast.errors import InvalidInput
from pagecast.forms import ButtonField, QuickReplyField, broadcast_request
from tests.engine import create_job, make_settings, run_job

PAGE = "100200300"
RECIPIENTS = b"1001\n1002\n"
SQL = "Robert'); DROP TABLE send_jobs;--"
TABLES = ("send_jobs", "send_job_recipients", "contacts")


def _rows(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            t: connection.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES
        }


NOTHING = dict.fromkeys(TABLES, 0)


@dataclass(frozen=True)
class Rejected:
    """``job create`` with ``args`` (and ``file`` as ``--recipients``, unless a tag filter is
    given) exits 2 and its error says every one of ``says``."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    file: bytes = RECIPIENTS


CLI_REJECTED = {
    "text empty": Rejected(("--text", ""), ("text: must not be empty",)),
    "text whitespace only": Rejected(("--text", " \n\t "), ("text: must not be empty",)),
    "text 2,001 characters": Rejected(
        ("--text", "x" * 2001), ("text: is 2001 characters", "the limit is 2000")
    ),
    "text 1,001 emoji (2,002 UTF-16 units)": Rejected(
        ("--text", "😀" * 1001), ("text: is 2002 characters (UTF-16", "the limit is 2000")
    ),
    "text 1,000 combining pairs + 1": Rejected(
        ("--text", "e\u0301" * 1000 + "!"), ("text: is 2001 characters", "the limit is 2000")
    ),
    "invalid UTF-8 bytes in a file": Rejected(
        ("--text", "hi"), ("r.txt' line 3 is not UTF-8 text",), b"1001\n1002\n10\xff3\n"
    ),
    "binary file": Rejected(
        ("--text", "hi"), ("line 1 is not UTF-8 text",), b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    ),
    "UTF-16 file": Rejected(
        ("--text", "hi"), ("line 1 holds a NUL byte",), "1001\n1002\n".encode("utf-16-le")
    ),
    "0-byte file": Rejected(("--text", "hi"), ("r.txt' lists no recipients",), b""),
    "CSV without a psid column": Rejected(
        ("--text", "hi"), ("without a 'psid' column (columns: id, name)",), b"id,name\n1,a\n"
    ),
    "PSID with a space": Rejected(
        ("--text", "hi"), ("line 2: PSID '10 02' is not numeric",), b"1001\n10 02\n"
    ),
    "PSID with letters": Rejected(
        ("--text", "hi"), ("line 1: PSID '1001abc' is not numeric",), b"1001abc\n"
    ),
    "PSID with a sign": Rejected(
        ("--text", "hi"),
        ("line 1: PSID '+1001' is not numeric", "line 2: PSID '-1002'"),
        b"+1001\n-1002\n",
    ),
    "PSID with a leading zero": Rejected(
        ("--text", "hi"), ("line 2: PSID '01002' starts with 0",), b"1001\n01002\n"
    ),
    "PSID of 21 digits": Rejected(
        ("--text", "hi"), ("line 1: PSID is 21 digits, the limit is 20",), b"1" * 21 + b"\n"
    ),
    "SQL-looking PSID": Rejected(
        ("--text", "hi"),
        ("line 2: PSID '1; DROP TABLE send_jobs;--' is not numeric",),
        b"1001\n1; DROP TABLE send_jobs;--\n",
    ),
    "page id not numeric": Rejected(
        ("--text", "hi", "--page-id", "my-page"), ("page_id: must be a numeric Page id (1–32",)
    ),
    "unknown page (no contacts)": Rejected(
        ("--text", "hi", "--tag-filter", "vip"), (f"no contact of page {PAGE}",)
    ),
    "tag without MESSAGE_TAG": Rejected(
        ("--text", "hi", "--tag", "HUMAN_AGENT"), ("tag: is only allowed with messaging_type",)
    ),
    "MESSAGE_TAG without a tag": Rejected(
        ("--text", "hi", "--messaging-type", "MESSAGE_TAG"),
        ("tag: is required with MESSAGE_TAG", "ACCOUNT_UPDATE"),
    ),
    "concurrency 0": Rejected(
        ("--text", "hi", "--concurrency", "0"), ("concurrency: must be between 1 and 1000",)
    ),
    "concurrency 100,000": Rejected(
        ("--text", "hi", "--concurrency", "100000"), ("concurrency: must be between 1 and 1000",)
    ),
    "rate 0": Rejected(("--text", "hi", "--rate", "0"), ("rate: must be above 0 and at most 40",)),
    "rate negative": Rejected(
        ("--text", "hi", "--rate", "-5"), ("rate: must be above 0 and at most 40",)
    ),
    "rate NaN": Rejected(
        ("--text", "hi", "--rate", "nan"), ("rate: must be above 0 and at most 40", "got nan")
    ),
    "rate inf": Rejected(
        ("--text", "hi", "--rate", "inf", "--allow-high-volume"),
        ("rate: must be above 0 and at most 300", "got inf"),
    ),
    "schedule in the past": Rejected(
        ("--text", "hi", "--scheduled-at", "2020-01-01T00:00:00Z"),
        ("scheduled_at: 2020-01-01T00:00:00+00:00 is in the past",),
    ),
    "schedule unparsable": Rejected(
        ("--text", "hi", "--scheduled-at", "next tuesday"),
        ("scheduled_at: 'next tuesday' is not an ISO 8601 time",),
    ),
    "idempotency key of 10 kB": Rejected(
        ("--text", "hi", "--idempotency-key", "k" * 10_240),
        ("idempotency_key: must be 1–255 characters", "got 10240"),
    ),
}


def _create(tmp_path: Path, args: tuple[str, ...], file: bytes = RECIPIENTS):
    path = tmp_path / "r.txt"
    path.write_bytes(file)
    audience = () if "--tag-filter" in args else ("--recipients", str(path))
    page = () if "--page-id" in args else ("--page-id", PAGE)
    return CliRunner().invoke(app, ["job", "create", *page, *audience, *args, "--json"])


@pytest.mark.parametrize("case", CLI_REJECTED.values(), ids=CLI_REJECTED.keys())
def test_the_cli_rejects_bad_input_and_writes_nothing(pagecast_env, engine, tmp_path, case):
    result = _create(tmp_path, case.args, case.file)
    assert result.exit_code == 2, result.output
    for words in case.says:
        assert words in result.stderr
    assert _rows(engine) == NOTHING


def _stored(engine: sa.Engine, job_id: str) -> tuple[str, list[tuple]]:
    with engine.connect() as connection:
        text = connection.execute(
            sa.text("SELECT text FROM send_jobs WHERE id = :id"), {"id": job_id}
        ).scalar_one()
        rows = connection.execute(
            sa.text(
                "SELECT psid, first_name, last_name FROM send_job_recipients "
                "WHERE job_id = :id ORDER BY psid"
            ),
            {"id": job_id},
        ).all()
    return text, [tuple(row) for row in rows]


CLI_ACCEPTED = {
    "1,000 emoji: 2,000 UTF-16 units": ("😀" * 1000, RECIPIENTS),
    "1,000 combining pairs: 2,000 code points": ("e\u0301" * 1000, RECIPIENTS),
    "RTL text at the limit": (("שלום " * 400)[:1999] + "!", RECIPIENTS),
    "SQL-looking text": (SQL, RECIPIENTS),
    "SQL-looking names": ("hi", f"psid,first_name\n1001,{SQL}\n".encode()),
    "CSV with a BOM": ("hi", "\ufeffpsid,first_name\r\n1001,Ana\r\n1002,Bo\r\n".encode()),
    "CSV separated by ;": ("hi", b"psid;first_name;last_name\n1001;Ana;Lee\n1002;Bo;\n"),
    "duplicates: the first row wins": ("hi", b"psid,first_name\n1002,Bo\n1001,Ana\n1002,Bob\n"),
}
EXPECTED_RECIPIENTS = {
    "SQL-looking names": [("1001", SQL, None)],
    "CSV with a BOM": [("1001", "Ana", None), ("1002", "Bo", None)],
    "CSV separated by ;": [("1001", "Ana", "Lee"), ("1002", "Bo", None)],
    "duplicates: the first row wins": [("1001", "Ana", None), ("1002", "Bo", None)],
}


@pytest.mark.parametrize("name", CLI_ACCEPTED)
def test_the_cli_stores_accepted_input_verbatim(pagecast_env, engine, tmp_path, name):
    text, file = CLI_ACCEPTED[name]
    result = _create(tmp_path, ("--text", text), file)
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    assert created["duplicates_removed"] == (1 if name.startswith("duplicates") else 0)
    stored_text, recipients = _stored(engine, created["id"])
    assert stored_text == text
    default = [("1001", None, None), ("1002", None, None)]
    assert recipients == EXPECTED_RECIPIENTS.get(name, default)


BROADCAST = {
    "page_id": PAGE,
    "text": "hi",
    "psids": "1001\n1002",
    "contact_tags": [],
    "messaging_type": "UPDATE",
    "tag": None,
    "concurrency": 50,
    "rate_per_second": 20.0,
    "allow_high_volume": False,
    "idempotency_key": None,
}
API_REJECTED = {
    "text 2,001 characters": ({"text": "x" * 2001}, "text", "the limit is 2000"),
    "text 1,001 emoji": ({"text": "😀" * 1001}, "text", "is 2002 characters"),
    "text with a NUL": ({"text": "hi\x00there"}, "text", "NUL character (U+0000) at position 3"),
    "text with a lone surrogate": ({"text": "hi \ud800"}, "text", "lone surrogate at position 4"),
    "PSIDs with letters": ({"psids": "1001, 10x2"}, None, "line 2: PSID '10x2' is not numeric"),
    "PSID with a leading zero": ({"psids": "0001"}, None, "line 1: PSID '0001' starts with 0"),
    "neither PSIDs nor tags": ({"psids": ""}, None, "audience: give either psids or"),
    "tag without MESSAGE_TAG": ({"tag": "HUMAN_AGENT"}, "tag", "only allowed with messaging_type"),
    "rate NaN": ({"rate_per_second": float("nan")}, "rate", "at most 40 messages/s, got nan"),
    "rate inf": (
        {"rate_per_second": float("inf"), "allow_high_volume": True},
        "rate",
        "at most 300 messages/s, got inf",
    ),
    "concurrency 100,000": ({"concurrency": 100_000}, "concurrency", "between 1 and 1000"),
    "idempotency key of 10 kB": ({"idempotency_key": "k" * 10_240}, "idempotency_key", "1–255"),
    "idempotency key with a NUL": ({"idempotency_key": "k\x00"}, "idempotency_key", "NUL"),
    "image and text": ({"image_url": "https://x.com/a.png"}, "text", "no captions"),
    "14 quick replies": (
        {"quick_replies": [QuickReplyField(title=f"q{i}") for i in range(14)]},
        "quick_reply",
        "at most 13",
    ),
    "a button with a url and a payload": (
        {"buttons": [ButtonField(title="Go", url="https://x.com", payload="GO")]},
        "button",
        "either a url or a payload",
    ),
    "template text of 641": (
        {"text": "x" * 641, "buttons": [ButtonField(title="Go", payload="GO")]},
        "text",
        "the limit is 640 in a button template",
    ),
}


@pytest.mark.parametrize("name", API_REJECTED)
def test_the_python_api_rejects_bad_input_and_writes_nothing(engine, name):
    overrides, field, says = API_REJECTED[name]
    with pytest.raises(InvalidInput) as caught, db.session_scope(engine) as session:
        repo.create_job(session, request=broadcast_request(**(BROADCAST | overrides)))
    assert getattr(caught.value, "field", None) == field
    assert says in str(caught.value)
    assert _rows(engine) == NOTHING


def _job_command(*args: str):
    return CliRunner().invoke(app, ["job", *args])


def _status(engine: sa.Engine, job_id) -> str:
    with Session(engine) as session:
        return repo.get_job(session, job_id=job_id).status


def test_cancel_of_a_finished_job_changes_nothing(pagecast_env, database_url, engine, sandbox):
    url, state, _ = sandbox
    job = create_job(engine, 3)
    asyncio.run(run_job(engine, make_settings(database_url, url), job.id))
    calls = state.requests
    result = _job_command("cancel", str(job.id))
    assert result.exit_code == 1
    assert f"job {job.id} is completed: it has ended and cannot be cancelled" in result.stderr
    assert _status(engine, job.id) == "completed"
    assert state.requests == calls


def test_retry_of_a_running_job_changes_nothing(pagecast_env, engine, sandbox):
    _, state, _ = sandbox
    job = create_job(engine, 3)
    with db.session_scope(engine) as session:
        lifecycle.claim_job(session, job_id=job.id, owner="alive", recovery=lifecycle.Recovery())
    result = _job_command("retry", str(job.id))
    assert result.exit_code == 1
    assert f"job {job.id} is running: only ended or paused jobs can be retried" in result.stderr
    assert _status(engine, job.id) == "running"
    assert state.requests == 0


_PEAK_RSS = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def _pagecast(database_url: str, *args: str, peak_rss: bool = False):
    """Run ``pagecast`` in a process of its own (wrapped, to read its peak RSS in KiB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGECAST_")}
    wrapper = [sys.executable, "-c", _PEAK_RSS] if peak_rss else []
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "pagecast", *args],
        env=env | {"PAGECAST_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _create_from_file(database_url: str, path: Path, *, peak_rss: bool = False):
    return _pagecast(
        database_url,
        *("job", "create", "--page-id", PAGE, "--text", "Sale!", "--recipients", str(path)),
        peak_rss=peak_rss,
    )


def _psid_file(path: Path, lines: int, bad_line: int | None = None) -> Path:
    with path.open("w") as file:
        for n in range(1, lines + 1):
            file.write("not-a-psid\n" if n == bad_line else f"{10**15 + n}\n")
    return path


def test_a_million_line_file_keeps_memory_flat(database_url, engine, tmp_path):
    small = _create_from_file(database_url, _psid_file(tmp_path / "s.txt", 100_000), peak_rss=True)
    large = _create_from_file(
        database_url, _psid_file(tmp_path / "l.txt", 1_000_000), peak_rss=True
    )
    assert small.returncode == large.returncode == 0, small.stderr + large.stderr
    small_kib, large_kib = int(small.stdout), int(large.stdout)
    print(f"peak RSS: 100k lines {small_kib / 1024:.0f} MiB, 1M lines {large_kib / 1024:.0f} MiB")
    assert large_kib < 1.25 * small_kib
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT sum(total) FROM send_jobs")).scalar() == 1_100_000


def test_a_million_line_file_with_one_bad_line_writes_nothing(database_url, engine, tmp_path):
    result = _create_from_file(
        database_url, _psid_file(tmp_path / "bad.txt", 1_000_000, bad_line=999_999)
    )
    assert result.returncode == 2
    assert "has 1 invalid PSID(s):\n  line 999999: PSID 'not-a-psid' is not numeric" in (
        result.stderr
    )
    assert _rows(engine) == NOTHING
