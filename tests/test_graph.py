import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pagecast.errors import (
    AmbiguousDelivery,
    JobFatalGraphError,
    RecipientGraphError,
    ThrottledError,
    TransientGraphError,
)
from pagecast.graph import MAX_RETRY_AFTER_SECONDS, OUTSIDE_WINDOW, GraphClient, classify
from pagecast.sandbox import SandboxConfig, running_sandbox


def _error(code, subcode=None, *, transient=False):
    error = {"message": f"error {code}", "type": "OAuthException", "code": code, "fbtrace_id": "x"}
    if subcode is not None:
        error["error_subcode"] = subcode
    if transient:
        error["is_transient"] = True
    return {"error": error}


@pytest.mark.parametrize(
    ("status", "code", "subcode", "kind"),
    [
        (400, 4, None, ThrottledError),
        (400, 17, None, ThrottledError),
        (400, 32, None, ThrottledError),
        (400, 613, None, ThrottledError),
        (400, 80006, None, ThrottledError),
        (429, 1, None, ThrottledError),
        (500, 1, None, TransientGraphError),
        (500, 2, None, TransientGraphError),
        (400, 1200, None, TransientGraphError),
        (400, 551, 1545041, RecipientGraphError),
        (400, 230, None, RecipientGraphError),
        (400, 100, 2018001, RecipientGraphError),
        (400, 10, 2018108, RecipientGraphError),
        (400, 200, 1545041, RecipientGraphError),
        (400, 10, 2018278, RecipientGraphError),
        (400, 190, 460, JobFatalGraphError),
        (400, 190, None, JobFatalGraphError),
        (400, 10, None, JobFatalGraphError),
        (400, 200, 2018027, JobFatalGraphError),
        (400, 200, 2018028, JobFatalGraphError),
        (400, 368, None, JobFatalGraphError),
        (400, 100, None, JobFatalGraphError),
        (400, 12345, None, RecipientGraphError),
    ],
)
def test_classification_table(status, code, subcode, kind):
    error = classify(status, _error(code, subcode))
    assert type(error) is kind
    assert (error.code, error.subcode, error.http_status) == (code, subcode, status)


def test_outside_window_is_a_skip():
    error = classify(400, _error(10, 2018278))
    assert error.skip_reason == OUTSIDE_WINDOW
    assert error.code_key == "10/2018278"


def test_is_transient_flag():
    assert type(classify(400, _error(9999, transient=True))) is TransientGraphError


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, ThrottledError),  # refused: retried after Retry-After
        (503, TransientGraphError),  # refused: retried
        (500, AmbiguousDelivery),  # may have reached Meta: unknown, never resent
        (502, AmbiguousDelivery),
        (504, AmbiguousDelivery),
        (404, RecipientGraphError),
    ],
)
def test_answers_without_a_graph_error_body(status, kind):
    for body in (None, "<html><body>Bad Gateway</body></html>"):
        error = classify(status, body)
        assert type(error) is kind
        assert error.code_key == f"http_{status}"


async def test_token_goes_in_the_header_with_appsecret_proof():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"recipient_id": "1", "message_id": "m_1"})

    client = GraphClient(
        base_url="http://graph.test/",
        version="v25.0",
        token_for=lambda page: f"token-{page}",
        concurrency=4,
        app_secret="s3cret",
        transport=httpx.MockTransport(handler),
    )
    async with client:
        result = await client.send_text(
            page_id="42", psid="1", text="hi", messaging_type="MESSAGE_TAG", tag="ACCOUNT_UPDATE"
        )
    assert result.message_id == "m_1"
    (request,) = seen
    assert str(request.url) == "http://graph.test/v25.0/42/messages"
    assert "token" not in str(request.url)
    assert request.headers["authorization"] == "Bearer token-42"
    body = json.loads(request.content)
    assert body["appsecret_proof"] == hmac.new(b"s3cret", b"token-42", hashlib.sha256).hexdigest()
    assert body["tag"] == "ACCOUNT_UPDATE" and "access_token" not in body


async def test_usage_headers_are_reported():
    usage = {"123": [{"type": "pages", "call_count": 12, "total_cputime": 81, "total_time": 5}]}

    def handler(request):
        return httpx.Response(
            200,
            json={"recipient_id": "1", "message_id": "m_1"},
            headers={"X-Business-Use-Case-Usage": json.dumps(usage), "X-Page-Usage": "oops"},
        )

    client = GraphClient(
        base_url="http://g",
        version="v25.0",
        token_for=lambda p: "t",
        concurrency=1,
        transport=httpx.MockTransport(handler),
    )
    async with client:
        result = await client.send_text(page_id="1", psid="1", text="x", messaging_type="UPDATE")
    assert result.usage_percent == 81


async def test_connection_refused_is_transient_not_ambiguous(unused_tcp_port):
    client = GraphClient(
        base_url=f"http://127.0.0.1:{unused_tcp_port}",
        version="v25.0",
        token_for=lambda p: "t",
        concurrency=1,
    )
    async with client:
        with pytest.raises(TransientGraphError, match="not sent"):
            await client.send_text(page_id="1", psid="1", text="x", messaging_type="UPDATE")


async def test_dropped_connection_after_sending_is_ambiguous():
    with running_sandbox(SandboxConfig(ambiguous_rate=1.0)) as (url, sandbox):
        client = GraphClient(base_url=url, version="v25.0", token_for=lambda p: "t", concurrency=1)
        async with client:
            with pytest.raises(AmbiguousDelivery):
                await client.send_text(page_id="1", psid="1", text="x", messaging_type="UPDATE")
        assert sandbox.stats()["delivered"] == 1


async def test_errors_from_the_sandbox_are_typed():
    config = SandboxConfig(fail_psids={"7": "551/1545041"}, rate_limit_per_page=1)
    with running_sandbox(config) as (url, _):
        client = GraphClient(base_url=url, version="v25.0", token_for=lambda p: "t", concurrency=1)
        async with client:
            with pytest.raises(RecipientGraphError) as caught:
                await client.send_text(page_id="1", psid="7", text="x", messaging_type="UPDATE")
            assert caught.value.code_key == "551/1545041"
            with pytest.raises(ThrottledError):
                await client.send_text(page_id="1", psid="8", text="x", messaging_type="UPDATE")


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0.5", 0.5), ("99999", MAX_RETRY_AFTER_SECONDS), ("soon", None), (None, None)],
)
async def test_retry_after_of_a_throttled_answer(header, expected):
    headers = {"Retry-After": header} if header else {}
    client = GraphClient(
        base_url="http://graph.test",
        version="v25.0",
        token_for=lambda p: "t",
        concurrency=1,
        transport=httpx.MockTransport(lambda request: httpx.Response(429, headers=headers)),
    )
    async with client:
        with pytest.raises(ThrottledError) as caught:
            await client.send_text(page_id="1", psid="1", text="x", messaging_type="UPDATE")
    assert caught.value.retry_after == expected


async def test_retry_after_as_an_http_date():
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    client = GraphClient(
        base_url="http://graph.test",
        version="v25.0",
        token_for=lambda p: "t",
        concurrency=1,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(429, headers={"Retry-After": when})
        ),
    )
    async with client:
        with pytest.raises(ThrottledError) as caught:
            await client.send_text(page_id="1", psid="1", text="x", messaging_type="UPDATE")
    assert 28 <= caught.value.retry_after <= 30


@pytest.mark.parametrize("token", ["tok\u00e9n", "token\n"])
async def test_a_token_no_header_can_carry_is_job_fatal_before_any_call(token):
    calls = []
    client = GraphClient(
        base_url="http://graph.test",
        version="v25.0",
        token_for=lambda p: token,
        concurrency=1,
        transport=httpx.MockTransport(lambda request: calls.append(request) or httpx.Response(200)),
    )
    async with client:
        with pytest.raises(JobFatalGraphError, match="not printable ASCII"):
            await client.send_text(page_id="1", psid="1", text="x", messaging_type="UPDATE")
    assert calls == []
