"""Messenger webhooks over real HTTP to the running receiver: the verification handshake, signatures
(forgery, tampering, replay), limits, and what events do to recipients, jobs and contacts."""

import json
import time
from datetime import UTC, datetime

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import select

from benchmarks.webhook_load import load_while_sending, lost_or_twice, wait_settled
from pagecast import db, repo, webhooks
from pagecast.audience import read_contacts
from pagecast.models import SendJobRecipient
from pagecast.server import running_receiver
from pagecast.settings import Settings
from tests.engine import (
    PAGE,
    assert_counters_match_rows,
    create_job,
    job_row,
    make_settings,
    recipient_counts,
    run_job,
)

SECRET = "app-secret-for-tests"
VERIFY = "verify-me"


def _ms(moment: datetime | None = None) -> int:
    return int((moment or datetime.now(UTC)).timestamp() * 1000)


def item(psid: str, kind: str, *, at: int | None = None, page: str = PAGE, **fields) -> dict:
    """One ``messaging`` item: ``delivery``/``read`` (a watermark), ``message`` (``text``),
    ``postback``, or any other kind Meta may send."""
    at = at or _ms()
    body = {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": at}
    if kind in ("delivery", "read"):
        body[kind] = {"watermark": at}
    elif kind == "message":
        body["message"] = {"mid": f"m_{psid}_{at}", "text": fields.get("text", "hello")}
    elif kind == "postback":
        body["postback"] = {"title": "Go", "payload": "GO"}
    else:
        body[kind] = fields or {"x": 1}
    return body


def payload(*items: dict, page: str = PAGE) -> bytes:
    entry = {"id": page, "time": _ms(), "messaging": list(items)}
    return json.dumps({"object": "page", "entry": [entry]}).encode()


def post(url: str, body: bytes, *, secret: str = SECRET, **headers) -> httpx.Response:
    signed = {webhooks.SIGNATURE_HEADER: webhooks.signature(secret, body)} if secret else {}
    return httpx.post(url, content=body, headers=signed | headers, timeout=10)


def wait_applied(engine: sa.Engine, timeout: float = 10.0) -> None:
    assert webhooks.settled(engine, timeout=timeout), "stored webhook events were not applied"


def stored_events(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM webhook_events")).scalar_one()


def rows(engine: sa.Engine, job_id) -> dict[str, SendJobRecipient]:
    with db.session_scope(engine) as session:
        found = session.exec(select(SendJobRecipient).where(SendJobRecipient.job_id == job_id))
        return {r.psid: r for r in found}


@pytest.fixture
def receiver(database_url, engine):
    settings = Settings(
        database_url=database_url,
        app_secret=SECRET,
        webhook_verify_token=VERIFY,
    )
    with running_receiver(settings, engine) as (url, applier):
        yield url, applier


@pytest.fixture
async def sent_job(engine, database_url, sandbox):
    """A job of 20 recipients, every one sent through the sandbox."""
    url, _, _ = sandbox
    job = create_job(engine, 20)
    await run_job(engine, make_settings(database_url, url), job.id)
    assert job_row(engine, job.id).sent == 20
    return job


def test_verification_answers_the_challenge_only_to_the_verify_token(receiver):
    url, _ = receiver
    asked = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "4242"}
    answer = httpx.get(url, params=asked)
    assert (answer.status_code, answer.text) == (200, "4242")
    assert httpx.get(url, params=asked | {"hub.verify_token": "guess"}).status_code == 403
    assert httpx.get(url, params=asked | {"hub.mode": "unsubscribe"}).status_code == 403
    assert httpx.get(url).status_code == 403


@pytest.mark.parametrize(
    "sign",
    [
        pytest.param(lambda body: {}, id="missing"),
        pytest.param(
            lambda body: {webhooks.SIGNATURE_HEADER: webhooks.signature("forged", body)},
            id="forged",
        ),
        pytest.param(
            lambda body: {webhooks.SIGNATURE_HEADER: webhooks.signature(SECRET, body + b" ")},
            id="tampered",
        ),
        pytest.param(lambda body: {webhooks.SIGNATURE_HEADER: "sha256="}, id="empty"),
        pytest.param(
            lambda body: {"X-Hub-Signature": webhooks.signature(SECRET, body)}, id="sha1-header"
        ),
    ],
)
def test_a_body_without_a_valid_signature_gets_403_and_stores_nothing(receiver, engine, sign):
    url, _ = receiver
    body = payload(item("2001", "message", text="STOP"))
    answer = httpx.post(url, content=body, headers=sign(body))
    assert answer.status_code == 403
    assert stored_events(engine) == 0


def test_size_and_json_limits(receiver, engine):
    url, _ = receiver
    big = payload(*[item(str(3000 + i), "message") for i in range(10_000)])
    assert len(big) > Settings().webhook_max_body_bytes
    assert post(url, big).status_code == 413
    streamed = httpx.post(url, content=iter([big]))  # no Content-Length: counted as it arrives
    assert streamed.status_code == 413
    assert post(url, b"{not json").status_code == 400
    assert stored_events(engine) == 0


def test_unknown_kinds_are_ignored_and_counted(receiver, engine):
    url, _ = receiver
    body = payload(
        item("2001", "reaction"),
        item("2001", "optin"),
        {"sender": "not-a-dict"},
        item(PAGE, "message"),  # the page's own echo
    )
    answer = post(url, body)
    assert answer.status_code == 200
    assert answer.json() == {"events": 0, "stored": 0}
    other_object = json.dumps({"object": "instagram", "entry": []}).encode()
    assert post(url, other_object).status_code == 200
    for odd in ({"entry": 5}, {"entry": [{"id": PAGE, "messaging": 5, "standby": "x"}]}):
        assert post(url, json.dumps({"object": "page"} | odd).encode()).status_code == 200
    received = httpx.get(f"{url}/stats").json()["received"]
    assert received["reaction"] == received["optin"] == received["malformed"] == 1
    assert received["echo"] == received["object"] == 1
    assert stored_events(engine) == 0


async def test_receipts_mark_sent_rows_delivered_then_read_and_a_replay_changes_nothing(
    receiver, engine, sent_job
):
    url, _ = receiver
    psids = sorted(rows(engine, sent_job.id))
    delivered = payload(*[item(p, "delivery") for p in psids[:15]])
    assert post(url, delivered).json() == {"events": 15, "stored": 15}
    read = payload(*[item(p, "read") for p in psids[:5]])
    assert post(url, read).json() == {"events": 5, "stored": 5}
    wait_applied(engine)
    job = job_row(engine, sent_job.id)
    assert (job.sent, job.delivered, job.read) == (20, 15, 5)

    for body in (delivered, read):  # Meta redelivers: the same signed body, byte for byte
        assert post(url, body).json()["stored"] == 0
    wait_applied(engine)
    assert (job_row(engine, sent_job.id).delivered, job_row(engine, sent_job.id).read) == (15, 5)
    after = rows(engine, sent_job.id)
    assert sum(r.delivered_at is not None for r in after.values()) == 15
    assert sum(r.read_at is not None for r in after.values()) == 5


async def test_a_read_receipt_arriving_first_counts_as_delivered_too(receiver, engine, sent_job):
    url, _ = receiver
    psid = sorted(rows(engine, sent_job.id))[0]
    now = _ms()
    post(url, payload(item(psid, "read", at=now)))
    post(url, payload(item(psid, "delivery", at=now - 10)))  # older watermark, arrives later
    wait_applied(engine)
    job = job_row(engine, sent_job.id)
    assert (job.delivered, job.read) == (1, 1)
    row = rows(engine, sent_job.id)[psid]
    assert row.delivered_at == row.read_at


async def test_a_watermark_before_the_attempt_covers_nothing(receiver, engine, sent_job):
    url, _ = receiver
    psid = sorted(rows(engine, sent_job.id))[0]
    before = _ms(rows(engine, sent_job.id)[psid].attempted_at) - 1_000
    post(url, payload(item(psid, "delivery", at=before), item(psid, "read", at=before)))
    wait_applied(engine)
    job = job_row(engine, sent_job.id)
    assert (job.delivered, job.read) == (0, 0)


async def test_a_delivery_receipt_resolves_unknown_recipients_to_sent(
    receiver, engine, database_url, sandbox
):
    url, _ = receiver
    sandbox_url, state, ledger = sandbox
    state.config.ambiguous_rate = 1.0  # delivered, then the connection drops: unknown
    job = create_job(engine, 6)
    await run_job(engine, make_settings(database_url, sandbox_url), job.id)
    ended = job_row(engine, job.id)
    assert (ended.status, ended.unknown) == ("completed_with_errors", 6)

    psids = sorted(r["psid"] for r in ledger())
    post(url, payload(*[item(p, "delivery") for p in psids[:4]]))
    wait_applied(engine)
    assert recipient_counts(engine, job.id) == {"sent": 4, "unknown": 2}
    assert_counters_match_rows(engine, job.id)
    post(url, payload(*[item(p, "delivery") for p in psids[4:]]))
    wait_applied(engine)
    resolved = job_row(engine, job.id)
    assert (resolved.status, resolved.sent, resolved.unknown, resolved.delivered) == (
        "completed",
        6,
        0,
        6,
    )
    assert all(r.error_key is None for r in rows(engine, job.id).values())


def test_a_receipt_for_a_recipient_in_flight_waits_for_its_answer(engine):
    job = create_job(engine, 3)
    psid = sorted(rows(engine, job.id))[0]
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE send_jobs SET status = 'running', started_at = now() - interval '1 minute' "
                "WHERE id = :id"
            ),
            {"id": job.id},
        )
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'sending', "
                "attempted_at = now() - interval '1 second' WHERE job_id = :id AND psid = :psid"
            ),
            {"id": job.id, "psid": psid},
        )
    event = webhooks.parse(json.loads(payload(item(psid, "delivery"))), keywords=frozenset())
    with db.session_scope(engine) as session:
        assert webhooks.store(session, event.events) == 1
        assert webhooks.apply_stored(session).deferred == 1
    with engine.begin() as connection:  # the answer is recorded
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'sent' WHERE job_id = :id AND psid = :psid"
            ),
            {"id": job.id, "psid": psid},
        )
        connection.execute(sa.text("UPDATE send_jobs SET sent = 1 WHERE id = :id"), {"id": job.id})
    with db.session_scope(engine) as session:
        assert webhooks.apply_stored(session).events == 0  # not before its second is up
    time.sleep(1.1)
    with db.session_scope(engine) as session:
        applied = webhooks.apply_stored(session)
    assert (applied.events, applied.delivered) == (1, 1)
    assert job_row(engine, job.id).delivered == 1


def test_a_receipt_waits_for_a_row_in_flight_ten_minutes_at_most(engine):
    """A row its dead runner left sending may stay so until a sweep: the receipt gives up waiting."""
    job = create_job(engine, 1)
    (psid,) = rows(engine, job.id)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE send_jobs SET status = 'running', started_at = now() WHERE id = :id"),
            {"id": job.id},
        )
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'sending', attempted_at = now() "
                "WHERE job_id = :id"
            ),
            {"id": job.id},
        )
    event = webhooks.parse(json.loads(payload(item(psid, "delivery"))), keywords=frozenset())
    with db.session_scope(engine) as session:
        webhooks.store(session, event.events)
        session.execute(
            sa.text("UPDATE webhook_events SET received_at = now() - interval '11 min'")
        )
        applied = webhooks.apply_stored(session)
    assert (applied.events, applied.deferred, applied.delivered) == (1, 0, 0)


def test_messages_open_the_window_and_stop_opts_out_of_jobs_not_yet_over(receiver, engine):
    url, _ = receiver
    pending = create_job(engine, 3)
    psids = sorted(rows(engine, pending.id))
    written = datetime.now(UTC)
    body = payload(
        item(psids[0], "message", text="  stop "),
        item(psids[1], "message", text="stop sending me deals?"),
        item("4242", "postback", at=_ms(written)),
    )
    assert post(url, body).json() == {"events": 3, "stored": 3}
    wait_applied(engine)
    with engine.connect() as connection:
        contacts = {
            psid: (opted_out, last)
            for psid, opted_out, last in connection.execute(
                sa.text("SELECT psid, opted_out, last_interaction_at FROM contacts")
            )
        }
    assert contacts[psids[0]][0] is True
    assert contacts[psids[1]][0] is False
    assert abs((contacts["4242"][1] - written).total_seconds()) < 0.01
    assert recipient_counts(engine, pending.id) == {"skipped": 1, "pending": 2}
    assert rows(engine, pending.id)[psids[0]].error_key == "contact_opted_out"
    assert_counters_match_rows(engine, pending.id)

    later = create_job(engine, 3)  # the same PSIDs: the opted-out one is left out
    assert job_row(engine, later.id).total == 2


def _import(engine, path, text: str) -> None:
    path.write_text(text)
    with db.session_scope(engine) as session:
        repo.import_contacts(session, page_id=PAGE, contacts=read_contacts(path))


def _opted_out(engine, psid: str) -> bool:
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT opted_out FROM contacts WHERE psid = :psid"), {"psid": psid}
        ).scalar_one()


def test_a_stop_outlives_a_contacts_import_that_does_not_say_otherwise(receiver, engine, tmp_path):
    url, _ = receiver
    post(url, payload(item("6161", "message", text="UNSUBSCRIBE")))
    wait_applied(engine)
    contacts = tmp_path / "contacts.csv"
    _import(engine, contacts, "psid,first_name,tags\n6161,Ana,vip\n6262,Bo,vip\n")
    assert _opted_out(engine, "6161") is True
    assert _opted_out(engine, "6262") is False
    _import(engine, contacts, "psid,opted_out\n6161,no\n")  # said explicitly: opted back in
    assert _opted_out(engine, "6161") is False


def test_a_message_timestamp_in_the_future_opens_the_window_only_until_now(receiver, engine):
    url, _ = receiver
    post(url, payload(item("5151", "message", at=_ms() + 86_400_000)))
    wait_applied(engine)
    with engine.connect() as connection:
        last = connection.execute(
            sa.text("SELECT last_interaction_at FROM contacts WHERE psid = '5151'")
        ).scalar_one()
    assert last <= datetime.now(UTC)


def test_the_receiver_will_not_start_without_its_secrets(engine, database_url):
    from pagecast.errors import ConfigurationError
    from pagecast.webhook_app import create_app

    with pytest.raises(ConfigurationError, match="PAGECAST_WEBHOOK_VERIFY_TOKEN"):
        create_app(Settings(database_url=database_url, app_secret=SECRET), engine)


def wait_receipts_posted(state, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while state.receipts.waiting:
        assert time.monotonic() < deadline, state.stats()["receipts"]
        time.sleep(0.05)


async def test_a_job_sent_through_the_sandbox_gets_its_receipts_once(
    receiver, engine, database_url, sandbox
):
    url, _ = receiver
    sandbox_url, state, _ = sandbox
    state.config.update(
        {
            "webhook_url": url,
            "webhook_secret": SECRET,
            "read_receipt_rate": 0.5,
            "receipt_duplicate_rate": 0.3,
            "receipt_delay_ms": 300,
        }
    )
    job = create_job(engine, 300)
    await run_job(engine, make_settings(database_url, sandbox_url), job.id)
    wait_receipts_posted(state)
    wait_applied(engine)
    with engine.connect() as connection:
        read_psids = connection.execute(
            sa.text("SELECT count(DISTINCT psid) FROM webhook_events WHERE kind = 'read'")
        ).scalar_one()
    ended = job_row(engine, job.id)
    posted = state.stats()["receipts"]
    assert posted["posted"] > stored_events(engine) == 300 + read_psids  # duplicates dropped
    assert (ended.sent, ended.delivered, ended.read) == (300, 300, read_psids)
    assert 0 < read_psids < 300
    after = rows(engine, job.id).values()
    assert sum(r.read_at is not None for r in after) == read_psids
    assert all(
        r.delivered_at is not None and r.delivered_at <= (r.read_at or r.delivered_at)
        for r in after
    )


async def test_a_flood_of_events_while_a_job_sends_loses_none_and_applies_none_twice(
    receiver, engine, database_url, sandbox
):
    """1,000 events/s (a share posted twice) for 10 s while a job sends through the sandbox, which
    posts that job's receipts to the same receiver (`make bench` runs it for 30 s and times it)."""
    url, _ = receiver
    sandbox_url, state, _ = sandbox
    state.config.update({"webhook_url": url, "webhook_secret": SECRET, "latency_ms": 20})
    settings = make_settings(database_url, sandbox_url)
    flooded = await load_while_sending(
        engine,
        settings,
        receiver_url=url,
        secret=SECRET,
        seconds=10,
        per_second=1000,
        recipients=2000,
    )
    wait_settled(engine, lambda: state.receipts.waiting, timeout=60)
    assert set(flooded.statuses) == {200}
    assert flooded.replays > 0
    assert lost_or_twice(engine, flooded) == []
    (job_id,) = (row.id for row in _jobs(engine))
    ended = job_row(engine, job_id)
    assert (ended.sent, ended.delivered) == (2000, 2000)
    assert_counters_match_rows(engine, job_id)


def _jobs(engine):
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT id FROM send_jobs")).all()
