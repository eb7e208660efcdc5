import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlmodel import Session, func, select

from pagecast import db, repo
from pagecast.audience import ContactRow, recipients_from_psids
from pagecast.errors import IdempotencyConflict, InvalidAudience, JobNotFound
from pagecast.models import SendJob, SendJobRecipient
from pagecast.validation import validate_message

PAGE = "100200300"


def _request(audience, *, text="Hello {first_name}", key=None, **overrides):
    fields = {
        "page_id": PAGE,
        "message": validate_message(text, "UPDATE", None),
        "audience": audience,
        "concurrency": 10,
        "rate_per_second": 20.0,
        "idempotency_key": key,
    }
    return repo.JobRequest(**(fields | overrides))


def _create(engine, request):
    with db.session_scope(engine) as session:
        return repo.create_job(session, request=request)


def _count(engine, model) -> int:
    with Session(engine) as session:
        return session.exec(select(func.count()).select_from(model)).one()


def _contacts(engine, rows):
    with db.session_scope(engine) as session:
        return repo.import_contacts(session, page_id=PAGE, contacts=rows)


def test_create_job_from_psids(engine):
    created = _create(engine, _request(recipients_from_psids(["3", "1", "2", "1"])))
    assert created.created
    assert created.job.total == 3
    assert created.job.status == "pending"
    assert created.job.duplicates_removed == 1
    with Session(engine) as session:
        progress = repo.job_progress(session, job_id=created.job.id)
    assert progress.pending == 3
    assert progress.by_status == {"pending": 3}


def test_progress_mid_run_equals_the_rows_counted_by_status(engine):
    """Counters for the settled, a count of the rows in flight, the rest pending: the same as
    counting every row."""
    created = _create(engine, _request(recipients_from_psids([str(n) for n in range(1, 11)])))
    moves = {
        "1": "sent",
        "2": "sent",
        "3": "failed",
        "4": "unknown",
        "5": "sending",
        "6": "claimed",
    }
    with db.session_scope(engine) as session:
        for psid, status in moves.items():
            session.execute(
                sa.text("UPDATE send_job_recipients SET status = :s WHERE psid = :p"),
                {"s": status, "p": psid},
            )
        session.execute(
            sa.text("UPDATE send_jobs SET sent = 2, failed = 1, unknown = 1 WHERE id = :id"),
            {"id": created.job.id},
        )
    with Session(engine) as session:
        progress = repo.job_progress(session, job_id=created.job.id)
        rows = session.execute(
            sa.text("SELECT status, count(*) FROM send_job_recipients GROUP BY status")
        ).all()
    assert progress.by_status == dict(rows)
    assert progress.pending == 4


def test_a_page_of_jobs_gets_its_progress_in_two_statements(engine):
    """Each listed job gets its own counts and its errors, most frequent first, read in two
    statements however many jobs are listed (was: two per job)."""
    jobs = [
        _create(engine, _request(recipients_from_psids([str(n) for n in range(1, 6)]))).job
        for _ in range(3)
    ]
    moves = {  # job index: {psid: (status, error key)}
        1: {
            "1": ("failed", "551"),
            "2": ("sending", None),
            "3": ("failed", "100"),
            "4": ("failed", "100"),
        },
        2: {"5": ("unknown", "http_502")},
    }
    with db.session_scope(engine) as session:
        for index, rows in moves.items():
            for psid, (status, key) in rows.items():
                session.execute(
                    sa.text(
                        "UPDATE send_job_recipients SET status = :status, error_key = :key, "
                        "error_message = :key WHERE job_id = :id AND psid = :psid"
                    ),
                    {"status": status, "key": key, "id": jobs[index].id, "psid": psid},
                )
        session.execute(
            sa.text("UPDATE send_jobs SET failed = 3 WHERE id = :id"), {"id": jobs[1].id}
        )
        session.execute(
            sa.text("UPDATE send_jobs SET unknown = 1 WHERE id = :id"), {"id": jobs[2].id}
        )
    statements = []

    def count(*statement) -> None:
        statements.append(statement)

    with Session(engine) as session:
        loaded = [session.get(SendJob, job.id) for job in jobs]
        sa.event.listen(engine, "before_cursor_execute", count)
        try:
            listed = repo.jobs_progress(session, loaded)
        finally:
            sa.event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == 2
    assert [p.by_status for p in listed] == [
        {"pending": 5},
        {"pending": 1, "sending": 1, "failed": 3},
        {"pending": 4, "unknown": 1},
    ]
    assert [[(e.key, e.status, e.count) for e in p.errors] for p in listed] == [
        [],
        [("100", "failed", 2), ("551", "failed", 1)],
        [("http_502", "unknown", 1)],
    ]


def test_idempotency_key_returns_the_existing_job(engine):
    first = _create(engine, _request(recipients_from_psids(["1", "2"]), key="launch-1"))
    again = _create(engine, _request(recipients_from_psids(["1", "2"]), key="launch-1"))
    assert not again.created
    assert again.job.id == first.job.id
    assert _count(engine, SendJob) == 1
    assert _count(engine, SendJobRecipient) == 2


def test_idempotency_key_with_other_text_conflicts(engine):
    _create(engine, _request(recipients_from_psids(["1"]), key="launch-1"))
    with pytest.raises(IdempotencyConflict) as caught:
        _create(engine, _request(recipients_from_psids(["1"]), key="launch-1", text="Other"))
    assert caught.value.differing == ["text"]
    assert _count(engine, SendJob) == 1


def test_concurrent_creations_with_one_key_make_one_job(engine):
    results, barrier = [], threading.Barrier(4)

    def create():
        barrier.wait()
        results.append(_create(engine, _request(recipients_from_psids(["1", "2"]), key="race")))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r.job.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert _count(engine, SendJob) == 1
    assert _count(engine, SendJobRecipient) == 2


def test_tag_filter_selects_matching_contacts_and_skips_opted_out(engine):
    _contacts(
        engine,
        [
            ContactRow("1", "Ana", tags=("vip", "promo")),
            ContactRow("2", "Bo", tags=("promo",)),
            ContactRow("3", "Cy", tags=("vip",), opted_out=True),
            ContactRow("4", "Di", tags=()),
        ],
    )
    anyof = _create(engine, _request(repo.TagFilter(("vip", "promo"))))
    allof = _create(engine, _request(repo.TagFilter(("vip", "promo"), match_all=True)))
    assert anyof.job.total == 2
    assert allof.job.total == 1
    assert anyof.job.source == "tags:vip | promo"
    with Session(engine) as session:
        names = session.exec(
            select(SendJobRecipient.psid, SendJobRecipient.first_name).where(
                SendJobRecipient.job_id == anyof.job.id
            )
        ).all()
    assert sorted(names) == [("1", "Ana"), ("2", "Bo")]


def test_contacts_of_other_pages_are_not_recipients(engine):
    with db.session_scope(engine) as session:
        repo.import_contacts(session, page_id="999", contacts=[ContactRow("1", tags=("vip",))])
    with pytest.raises(InvalidAudience, match="no contact"):
        _create(engine, _request(repo.TagFilter(("vip",))))


def test_empty_tag_audience_writes_nothing(engine):
    _contacts(engine, [ContactRow("1", tags=("promo",))])
    with pytest.raises(InvalidAudience, match="matches tags:vip"):
        _create(engine, _request(repo.TagFilter(("vip",))))
    assert _count(engine, SendJob) == 0
    assert _count(engine, SendJobRecipient) == 0


def test_opted_out_contacts_are_excluded_from_file_audiences(engine):
    _contacts(engine, [ContactRow("2", opted_out=True)])
    created = _create(engine, _request(recipients_from_psids(["1", "2", "3"])))
    assert created.opted_out_excluded == 1
    assert created.job.total == 2


def test_audience_of_only_opted_out_contacts_is_rejected(engine):
    _contacts(engine, [ContactRow("1", opted_out=True)])
    with pytest.raises(InvalidAudience, match="opted out"):
        _create(engine, _request(recipients_from_psids(["1"])))
    assert _count(engine, SendJob) == 0


def test_import_contacts_inserts_then_updates(engine):
    seen = datetime(2026, 11, 20, tzinfo=UTC)
    first = _contacts(engine, [ContactRow("1", "Ana", last_interaction_at=seen), ContactRow("2")])
    second = _contacts(engine, [ContactRow("1", "Anna", tags=("vip",)), ContactRow("3")])
    assert (first.inserted, first.updated) == (2, 0)
    assert (second.inserted, second.updated) == (1, 1)
    with Session(engine) as session:
        row = session.execute(
            sa.text("SELECT first_name, tags, last_interaction_at FROM contacts WHERE psid = '1'")
        ).one()
    assert row == ("Anna", ["vip"], seen)


def test_unknown_job(session):
    import uuid

    with pytest.raises(JobNotFound):
        repo.get_job(session, job_id=uuid.uuid4())


def test_list_jobs_filters(engine):
    _create(engine, _request(recipients_from_psids(["1"])))
    _create(engine, _request(recipients_from_psids(["1"]), page_id="555"))
    with Session(engine) as session:
        assert len(repo.list_jobs(session)) == 2
        assert [j.page_id for j in repo.list_jobs(session, page_id="555")] == ["555"]
        assert repo.list_jobs(session, status="running") == []
