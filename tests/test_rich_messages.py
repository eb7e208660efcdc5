"""Rich messages: an attachment uploaded once per job and sent by id, quick replies, a button
template — validated to Meta's limits at creation, shaped as the sandbox (Meta's shapes) accepts."""

import json

import pytest
import sqlalchemy as sa
from prefect.utilities.callables import parameter_schema
from typer.testing import CliRunner

from flows.broadcast import broadcast
from pagecast import attachments, commands, db, repo
from pagecast.audience import ContactRow
from pagecast.cli import app
from pagecast.content import AttachmentType, build_content, parse_button, parse_quick_reply
from pagecast.errors import IdempotencyConflict, InvalidField
from pagecast.forms import QuickReplyField, broadcast_request
from pagecast.sandbox_messages import UNREACHABLE_HOST
from pagecast.validation import validate_message
from tests.engine import (
    PAGE,
    assert_counters_match_rows,
    create_job,
    job_row,
    make_settings,
    recipient_counts,
    run_job,
)

IMAGE = "https://cdn.example.com/sale.png"
runner = CliRunner()


def content(image=None, video=None, file=None, quick_replies=(), buttons=()):
    return build_content(
        attachments={
            AttachmentType.IMAGE: image,
            AttachmentType.VIDEO: video,
            AttachmentType.FILE: file,
        },
        quick_replies=[parse_quick_reply(spec) for spec in quick_replies],
        buttons=[parse_button(spec) for spec in buttons],
    )


def message(text, **parts):
    return validate_message(text, "UPDATE", None, content(**parts))


@pytest.mark.parametrize(
    ("text", "parts", "field", "says"),
    [
        ("hi", {"quick_replies": [f"q{i}" for i in range(14)]}, "quick_reply", "at most 13"),
        (
            "hi",
            {"quick_replies": ["x" * 21]},
            "quick_reply",
            "1–20 characters (UTF-16 code units), got 21",
        ),
        ("hi", {"quick_replies": ["😀" * 11]}, "quick_reply", "got 22"),
        ("hi", {"quick_replies": ["  "]}, "quick_reply", "1–20 characters"),
        ("hi", {"quick_replies": ["ok=" + "p" * 1001]}, "quick_reply", "payload must be 1–1000"),
        ("hi", {"buttons": ["a=https://x.com"] * 4}, "button", "1–3 buttons, got 4"),
        ("hi", {"buttons": ["no target"]}, "button", "TITLE=URL or TITLE=PAYLOAD"),
        ("hi", {"buttons": ["=https://x.com"]}, "button", "1–20 characters"),
        ("hi", {"buttons": ["Go=https://"]}, "button", "http(s) URL"),
        ("x" * 641, {"buttons": ["Go=GO"]}, "text", "the limit is 640 in a button template"),
        (None, {"image": "ftp://x.com/a.png"}, "image_url", "http(s) URL"),
        (None, {"image": "https://"}, "image_url", "http(s) URL"),
        (None, {"image": "https://x.com/" + "a" * 2000}, "image_url", "at most 2000"),
        (None, {"image": IMAGE, "video": IMAGE}, "attachment", "one attachment per message"),
        ("caption", {"image": IMAGE}, "text", "Messenger has no captions"),
        (None, {"image": IMAGE, "buttons": ["Go=GO"]}, "button", "not an attachment"),
        (None, {"quick_replies": ["Yes"]}, "text", "must not be empty"),
        ("hi", {"quick_replies": ["ok=" + "😀" * 501]}, "quick_reply", "got 1002"),
        ("hi", {"quick_replies": ["ok=a\x00b"]}, "quick_reply", "NUL"),
        ("hi", {"quick_replies": ["\ud800"]}, "quick_reply", "lone surrogate"),
        ("hi", {"buttons": ["Go=https://x.com/\x00"]}, "button", "NUL"),
        ("hi", {"buttons": ["Go=https://x .com/"]}, "button", "without spaces"),
        ("hi", {"buttons": ["Visit=javascript:alert(1)"]}, "button", "http(s) URL"),
        ("hi", {"buttons": ["Go=www.example.com"]}, "button", "http(s) URL"),
        (None, {"file": "https://x.com/a b.pdf"}, "file_url", "without spaces"),
        (None, {"buttons": ["Go=GO"]}, "text", "must not be empty"),
    ],
)
def test_rich_messages_are_validated_to_meta_limits(text, parts, field, says):
    with pytest.raises(InvalidField) as raised:
        message(text, **parts)
    assert raised.value.field == field
    assert says in str(raised.value)


def test_limits_are_reached_exactly():
    at_limit = message(
        "t" * 640,
        buttons=["a" * 20 + "=https://x.com/a", "B=" + "p" * 1000, "C=C"],
        quick_replies=[f"{'😀' * 10}={i}" for i in range(13)],
    )
    sent = at_limit.content.message("t" * 640)
    assert sent["attachment"]["payload"]["template_type"] == "button"
    assert [b["type"] for b in sent["attachment"]["payload"]["buttons"]] == [
        "web_url",
        "postback",
        "postback",
    ]
    assert len(sent["quick_replies"]) == 13
    assert sent["quick_replies"][0]["title"] == "😀" * 10


def _jobs(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM send_jobs")).scalar_one()


def test_the_cli_rejects_a_bad_rich_message_and_writes_nothing(pagecast_env, engine, tmp_path):
    psids = tmp_path / "psids.txt"
    psids.write_text("1001\n")
    base = ["job", "create", "--page-id", PAGE, "--recipients", str(psids)]
    for extra, says in [
        (["--image-url", IMAGE, "--text", "hi"], "text: an attachment is sent on its own"),
        (["--text", "hi"] + ["--quick-reply", "q"] * 14, "quick_reply: at most 13"),
        (["--text", "hi", "--button", "Later=REMIND_ME"], None),
        (["--file-url", "file:///etc/passwd"], "file_url: must be an http(s) URL"),
    ]:
        result = runner.invoke(app, base + extra)
        if says is None:  # a postback payload
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code == 2, result.output
        assert says in result.stderr
    assert _jobs(engine) == 1


async def test_an_image_job_uploads_once_and_sends_everyone_the_attachment_id(
    engine, database_url, sandbox
):
    url, state, ledger = sandbox
    job = create_job(
        engine, 120, text=None, content=content(image=IMAGE, quick_replies=["Yes", "No=NOPE"])
    )
    settings = make_settings(database_url, url, chunk_size=10, parallel_chunks=4)
    await run_job(engine, settings, job.id)
    ended = job_row(engine, job.id)
    assert (ended.status, ended.sent) == ("completed", 120)
    assert state.stats()["uploads"] == 1  # four chunks raced for it
    delivered = ledger()
    assert len(delivered) == 120
    payloads = {json.dumps(r["message"], sort_keys=True) for r in delivered}
    assert len(payloads) == 1
    (sent,) = map(json.loads, payloads)
    assert sent["attachment"] == {
        "type": "image",
        "payload": {"attachment_id": ended.attachment_id},
    }
    assert [(q["title"], q["payload"]) for q in sent["quick_replies"]] == [
        ("Yes", "Yes"),
        ("No", "NOPE"),
    ]


async def test_a_button_template_is_rendered_per_recipient(engine, database_url, sandbox):
    url, state, ledger = sandbox
    with db.session_scope(engine) as session:
        repo.import_contacts(
            session,
            page_id=PAGE,
            contacts=[ContactRow(psid="1000000000000000", first_name="Ana")],
        )
    job = create_job(
        engine,
        3,
        text="Hi {first_name}, 20% off",
        content=content(buttons=["Shop=https://shop.example.com", "Later=LATER"]),
    )
    await run_job(engine, make_settings(database_url, url), job.id)
    assert job_row(engine, job.id).sent == 3
    by_psid = {r["psid"]: r for r in ledger()}
    template = by_psid["1000000000000000"]["message"]["attachment"]["payload"]
    assert template["text"] == "Hi Ana, 20% off"
    assert by_psid["1000000000000000"]["text"] == "Hi Ana, 20% off"
    assert template["buttons"] == [
        {"type": "web_url", "title": "Shop", "url": "https://shop.example.com"},
        {"type": "postback", "title": "Later", "payload": "LATER"},
    ]
    assert state.stats()["uploads"] == 0


async def test_an_upload_meta_refuses_fails_the_job_before_anyone_is_sent(
    engine, database_url, sandbox
):
    url, state, ledger = sandbox
    job = create_job(
        engine, 30, text=None, content=content(image=f"https://{UNREACHABLE_HOST}/a.png")
    )
    await run_job(engine, make_settings(database_url, url, chunk_size=10), job.id)
    ended = job_row(engine, job.id)
    assert ended.status == "failed"
    assert "Failed to fetch the file" in ended.last_error
    assert recipient_counts(engine, job.id) == {"pending": 30}
    assert_counters_match_rows(engine, job.id)
    assert ledger() == []
    assert ended.attachment_id is None
    assert state.stats()["upload_calls"] == 1  # the other chunks saw the job stop


def test_an_idempotency_key_names_one_message_with_its_content(engine):
    create_job(engine, 2, text=None, content=content(image=IMAGE), idempotency_key="k1")
    again = create_job(engine, 2, text=None, content=content(image=IMAGE), idempotency_key="k1")
    assert _jobs(engine) == 1 and again.content == {"attachment": {"type": "image", "url": IMAGE}}
    with pytest.raises(IdempotencyConflict, match="content"):
        create_job(engine, 2, text=None, content=content(video=IMAGE), idempotency_key="k1")


def test_the_broadcast_form_builds_the_same_rich_message(engine):
    request = broadcast_request(
        page_id=PAGE,
        text="",
        psids="1001 1002",
        contact_tags=[],
        messaging_type="UPDATE",
        tag=None,
        concurrency=10,
        rate_per_second=20.0,
        allow_high_volume=False,
        idempotency_key=None,
        video_url="https://cdn.example.com/clip.mp4",
        quick_replies=[QuickReplyField(title="Yes"), QuickReplyField(title="No", payload="N")],
    )
    with db.session_scope(engine) as session:
        job = repo.create_job(session, request=request).job
    assert job.text is None
    assert job.content == {
        "attachment": {"type": "video", "url": "https://cdn.example.com/clip.mp4"},
        "quick_replies": [["Yes", "Yes"], ["No", "N"]],
    }
    schema = parameter_schema(broadcast.fn).model_dump()["properties"]
    assert (schema["quick_replies"]["maxItems"], schema["buttons"]["maxItems"]) == (13, 3)


def test_a_scheme_in_any_case_makes_a_url_button():
    (button,) = content(buttons=["Go=HTTPS://Shop.Example.com/a"]).buttons
    assert (button.type, button.target) == ("web_url", "HTTPS://Shop.Example.com/a")


async def test_transient_upload_failures_are_tried_again(
    engine, database_url, sandbox, monkeypatch
):
    monkeypatch.setattr(attachments, "UPLOAD_BACKOFF_SECONDS", 0.01)
    url, state, _ = sandbox
    state.config.upload_failures = 2
    job = create_job(engine, 20, text=None, content=content(image=IMAGE))
    await run_job(engine, make_settings(database_url, url, chunk_size=5), job.id)
    assert job_row(engine, job.id).sent == 20
    assert (state.stats()["upload_calls"], state.stats()["uploads"]) == (3, 1)


async def test_an_upload_failing_through_every_try_pauses_the_job_and_resume_uploads_again(
    engine, database_url, sandbox, monkeypatch
):
    monkeypatch.setattr(attachments, "UPLOAD_BACKOFF_SECONDS", 0.01)
    url, state, ledger = sandbox
    state.config.upload_failures = 100
    job = create_job(engine, 20, text=None, content=content(image=IMAGE))
    settings = make_settings(database_url, url, chunk_size=5)
    await run_job(engine, settings, job.id)
    paused = job_row(engine, job.id)
    assert paused.status == "paused"
    assert "attachment upload failed 4 times" in paused.last_error
    assert recipient_counts(engine, job.id) == {"pending": 20}
    assert state.stats()["upload_calls"] == attachments.UPLOAD_TRIES and ledger() == []

    state.config.upload_failures = 0
    with db.session_scope(engine) as session:
        commands.resume_job(session, job_id=job.id)
    await run_job(engine, settings, job.id)
    assert job_row(engine, job.id).sent == 20
    assert state.stats()["uploads"] == 1


def test_a_test_send_of_an_attachment_names_its_url(engine, pagecast_env, sandbox, monkeypatch):
    url, _, ledger = sandbox
    monkeypatch.setenv("PAGECAST_GRAPH_API_URL", url)
    monkeypatch.setenv(f"PAGECAST_PAGE_ACCESS_TOKEN__{PAGE}", "t")
    job = create_job(engine, 3, text=None, content=content(image=IMAGE, quick_replies=["Yes"]))
    result = runner.invoke(app, ["job", "test", str(job.id), "--psid", "4242", "--json"])
    assert result.exit_code == 0, result.output
    (sent,) = ledger()
    assert sent["message"]["attachment"] == {"type": "image", "payload": {"url": IMAGE}}
    (row,) = json.loads(result.stdout)
    assert (row["status"], row["text"]) == ("sent", f"image {IMAGE}; 1 quick replies")
