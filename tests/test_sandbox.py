import json
import subprocess
import sys
import time

import httpx
import pytest

from pagecast.sandbox import FAULTS, SandboxConfig, running_sandbox

PAGE = "100200300"


def _body(psid="1001", text="hi", **extra):
    return {
        "recipient": {"id": psid},
        "messaging_type": "UPDATE",
        "message": {"text": text},
    } | extra


@pytest.fixture
def sandbox(tmp_path):
    config = SandboxConfig(ledger_path=tmp_path / "ledger.jsonl", seed=7)
    with running_sandbox(config) as (url, state), httpx.Client(base_url=url) as client:
        yield client, state


def _send(client, psid="1001", token="tok", **extra):
    return client.post(f"/v25.0/{PAGE}/messages", json=_body(psid, access_token=token, **extra))


def _error(response):
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "is_transient", "fbtrace_id"}
    return error["code"], error.get("error_subcode")


def test_delivers_and_records_the_ledger(sandbox, tmp_path):
    client, _ = sandbox
    response = _send(client, "1001")
    assert response.status_code == 200
    assert response.json()["recipient_id"] == "1001"
    assert response.json()["message_id"].startswith("m_")
    assert (
        client.post("/v25.0/me/messages", json=_body("1002", access_token="t")).status_code == 200
    )
    stats = client.get("/__stats").json()
    assert stats["delivered"] == 2 and stats["duplicates"] == 0
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [(r["page_id"], r["psid"], r["text"]) for r in ledger] == [
        (PAGE, "1001", "hi"),
        ("me", "1002", "hi"),
    ]


def test_records_where_the_token_came_from(sandbox):
    client, _ = sandbox
    client.post(f"/v25.0/{PAGE}/messages", json=_body(access_token="t"))
    client.post(f"/v25.0/{PAGE}/messages", json=_body(), headers={"Authorization": "Bearer t"})
    client.post(f"/v25.0/{PAGE}/messages", json=_body(), params={"access_token": "t"})
    client.post(
        f"/v25.0/{PAGE}/messages",
        data={
            "recipient": '{"id": "5"}',
            "messaging_type": "UPDATE",
            "message": '{"text": "x"}',
            "access_token": "t",
        },
    )
    stats = client.get("/__stats").json()
    assert stats["token_via"] == {"body": 2, "header": 1, "query": 1}
    assert stats["urls"] == {
        f"/v25.0/{PAGE}/messages": 3,
        f"/v25.0/{PAGE}/messages?access_token=t": 1,
    }


def test_counts_duplicate_deliveries(sandbox):
    client, _ = sandbox
    _send(client, "1001")
    _send(client, "1001")
    assert client.get("/__stats").json()["duplicates"] == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messaging_type": "UPDATE", "message": {"text": "hi"}}, "recipient is required"),
        (_body(text=""), "must be non-empty"),
        (_body(text="x" * 2001), "less than or equal to 2000"),
        (_body(messaging_type="PROMO"), "messaging_type must be one of"),
        (_body(messaging_type="MESSAGE_TAG"), "valid message tag"),
    ],
)
def test_validates_requests_like_meta(sandbox, body, fragment):
    client, _ = sandbox
    response = client.post(f"/v25.0/{PAGE}/messages", json=body | {"access_token": "t"})
    assert response.status_code == 400
    assert _error(response) == (100, None)
    assert fragment in response.json()["error"]["message"]


def test_missing_and_unknown_tokens(sandbox):
    client, state = sandbox
    assert _error(client.post(f"/v25.0/{PAGE}/messages", json=_body())) == (104, None)
    state.config.valid_tokens = ["good"]
    assert _error(_send(client, token="bad")) == (190, 460)
    assert _send(client, token="good").status_code == 200


def test_per_page_rate_limit(sandbox):
    client, state = sandbox
    state.config.rate_limit_per_page = 5
    codes = [_send(client, str(1000 + i)).status_code for i in range(8)]
    assert codes == [200] * 5 + [400] * 3
    response = _send(client, "2000")
    assert _error(response) == (613, None) and response.json()["error"]["is_transient"]
    assert client.post("/v25.0/777/messages", json=_body(access_token="t")).status_code == 200
    stats = client.get("/__stats").json()
    assert stats["pages"][PAGE]["max_per_second"] == 5
    assert stats["errors"]["613"] == 4


def test_transient_faults(sandbox):
    client, state = sandbox
    state.config.transient_rate = 1.0
    response = _send(client)
    assert response.status_code == 500
    code, _ = _error(response)
    assert code in (1, 2) and response.json()["error"]["is_transient"]
    assert client.get("/__stats").json()["delivered"] == 0


def test_permanent_faults_are_per_psid_and_stable(sandbox):
    client, state = sandbox
    state.config.permanent_rate = 0.5
    first = {psid: _send(client, psid).status_code for psid in map(str, range(1000, 1040))}
    again = {psid: _send(client, psid).status_code for psid in first}
    assert first == again
    assert 0 < list(first.values()).count(400) < 40
    state.config.permanent_rate = 1.0
    codes = {_error(_send(client, str(p))) for p in range(2000, 2020)}
    assert codes == {(551, 1545041), (100, 2018001)}


def test_outside_window_and_explicit_failures(sandbox):
    client, state = sandbox
    state.config.outside_window_rate = 1.0
    assert _error(_send(client, "1")) == (10, 2018278)
    state.config.outside_window_rate = 0.0
    state.config.fail_psids = {"2": "368", "3": "100/2018001"}
    assert _error(_send(client, "2")) == (368, None)
    assert _error(_send(client, "3")) == (100, 2018001)


def test_token_revoked_after_n_sends(sandbox):
    client, state = sandbox
    state.config.revoke_after = 3
    assert [_send(client, str(i), token="old").status_code for i in range(3)] == [200] * 3
    assert _error(_send(client, "9", token="old")) == (190, 460)
    assert _send(client, "9", token="new").status_code == 200


def test_ambiguous_fault_delivers_then_drops_the_connection(sandbox, tmp_path):
    client, state = sandbox
    state.config.ambiguous_rate = 1.0
    with pytest.raises(httpx.RemoteProtocolError):
        _send(client, "1001")
    state.config.ambiguous_rate = 0.0
    assert client.get("/__stats").json()["delivered"] == 1
    assert "1001" in (tmp_path / "ledger.jsonl").read_text()


@pytest.mark.parametrize(
    ("fault", "status", "body"),
    [
        ("transient", 500, '"code": 2'),
        ("throttle_429", 429, "Too Many Requests"),
        ("html_503", 503, "<html>"),
        ("html_502", 502, "<html>"),
        ("malformed", 200, '{"recipient_id": "1", "message_id'),
        ("empty", 200, ""),
        ("hang", 200, '"message_id"'),
        ("reset", None, None),
    ],
)
def test_named_faults(sandbox, fault, status, body):
    client, state = sandbox
    state.config.update({"fail_psids": {"5": fault}, "hang_seconds": 0.3})
    try:
        response = _send(client, "5")
    except httpx.RemoteProtocolError:  # the connection was reset
        assert status is None
    else:
        assert response.status_code == status
        assert body in response.text if body else response.text == ""
    if fault == "throttle_429":
        assert response.headers["Retry-After"] == "2"
    stats = client.get("/__stats").json()
    assert stats["faults"] == {fault: 1}
    assert stats["delivered"] == FAULTS[fault][0]


def test_outages_by_calls_and_by_time(sandbox):
    client, state = sandbox
    state.config.update({"outage_fault": "html_503", "outage_calls": 2})
    assert [_send(client, str(i)).status_code for i in range(3)] == [503, 503, 200]
    state.config.update({"outage_until": time.time() + 0.3})
    assert _send(client, "7").status_code == 503
    time.sleep(0.3)
    assert _send(client, "8").status_code == 200
    assert client.post("/__config", json={"outage_fault": "nope"}).status_code == 400


def test_latency(sandbox):
    client, state = sandbox
    state.config.latency_ms = 120
    started = time.perf_counter()
    _send(client)
    assert time.perf_counter() - started >= 0.1


def test_config_and_reset_endpoints(sandbox):
    client, _ = sandbox
    assert client.post("/__config", json={"rate_limit_per_page": 1}).status_code == 200
    assert _send(client, "1").status_code == 200
    assert _send(client, "2").status_code == 400
    assert client.post("/__config", json={"nope": 1}).status_code == 400
    client.post("/__reset")
    assert client.get("/__stats").json() == {
        "requests": 0,
        "delivered": 0,
        "duplicates": 0,
        "max_in_flight": 0,
        "errors": {},
        "faults": {},
        "first_fault_at": {},
        "token_via": {},
        "urls": {},
        "pages": {},
        "uploads": 0,
        "upload_calls": 0,
        "receipts": {"waiting": 0},
    }


def test_cli_serves_the_sandbox(tmp_path, unused_tcp_port):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pagecast",
            "sandbox",
            "serve",
            "--port",
            str(unused_tcp_port),
            "--fail-psid",
            "42=551",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{unused_tcp_port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/__stats")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.1)
        response = httpx.post(f"{url}/v25.0/{PAGE}/messages", json=_body("42", access_token="t"))
        assert _error(response) == (551, None)
    finally:
        process.terminate()
        process.wait(10)
