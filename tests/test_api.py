"""The HTTP job API over real HTTP against the running server and real Postgres: keys and their
scope, every endpoint, idempotency, problem JSON for bad bodies, and live progress as SSE."""

import asyncio
import json

import httpx
import pytest
import sqlalchemy as sa

from pagecast import apikeys, db, progress
from pagecast.server import create_server, serving
from pagecast.settings import Settings
from tests.engine import PAGE, job_row, make_settings, run_job

OTHER_PAGE = "900800700"
PROBLEM = "application/problem+json"


@pytest.fixture
def server(database_url, engine, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = Settings(
        database_url=database_url, home=tmp_path, api_cors_origins="https://app.example"
    )
    with serving(create_server(settings, engine)) as url:
        yield f"{url}/v1"


def _key(engine, name="app", pages=()) -> str:
    with db.session_scope(engine) as session:
        return apikeys.create_key(session, name=name, page_ids=pages)[1]


@pytest.fixture
def client(server, engine):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {_key(engine)}"}) as c:
        yield c


def _jobs(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM send_jobs")).scalar_one()


BODY = {"page_id": PAGE, "text": "Hi {first_name}", "psids": ["1001", "1002", "1003"]}


def test_requests_without_a_valid_key_get_401(server, engine):
    key = _key(engine, "doomed")
    forged = "pck_" + "0" * 12 + "_" + "A" * 43
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {forged}"},
                    {"Authorization": key}):  # fmt: skip
        answer = httpx.get(f"{server}/jobs", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["content-type"] == PROBLEM
        assert answer.headers["www-authenticate"] == "Bearer"
    assert (
        httpx.get(f"{server}/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    )
    with db.session_scope(engine) as session:
        apikeys.revoke_key(session, name_or_key_id="doomed")
    assert (
        httpx.get(f"{server}/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    )


def test_failed_attempts_are_rate_limited_without_locking_valid_keys_out(server, engine):
    key = _key(engine)
    wrong = {"Authorization": "Bearer pck_" + "1" * 12 + "_" + "B" * 43}
    answers = [httpx.get(f"{server}/jobs", headers=wrong).status_code for _ in range(12)]
    assert answers == [401] * 10 + [429] * 2
    assert (
        httpx.get(f"{server}/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    )


def test_no_body_is_read_without_a_key_and_routing_errors_are_problems(server, client):
    garbage = httpx.post(f"{server}/jobs", content=b"{" * 100)  # no key: refused unread
    assert garbage.status_code == 401 and garbage.headers["content-type"] == PROBLEM
    big = client.post(
        "/jobs", content=b" " * 2_000_001, headers={"Content-Type": "application/json"}
    )
    assert big.status_code == 413 and big.json()["limit"] == 2_000_000
    for answer in (client.get("/nowhere"), client.delete("/jobs"), client.get("/jobs/not-a-uuid")):
        assert answer.headers["content-type"] == PROBLEM, answer.text
        assert answer.status_code in (404, 405, 422)
    assert client.get("/jobs/not-a-uuid").json()["field"] == "job_id"
    assert client.get("/jobs", params={"cursor": "garbage"}).json()["field"] == "cursor"
    assert client.get("/jobs", params={"limit": 1000}).json()["limit"] == 100


def test_create_read_list_and_act_on_a_job(client, engine):
    created = client.post("/jobs", json=BODY)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["status"], job["counts"]["total"], job["counts"]["pending"]) == ("pending", 3, 3)
    assert job["started"] is False and "the sweep starts it" in job["reason"]
    assert client.get(f"/jobs/{job['id']}").json()["counts"] == job["counts"]

    assert client.post(f"/jobs/{job['id']}/pause").json()["status"] == "paused"
    resumed = client.post(f"/jobs/{job['id']}/resume").json()
    assert (resumed["status"], resumed["started"]) == ("pending", False)
    assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    again = client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
    assert client.post(f"/jobs/{job['id']}/retry").status_code == 409

    for text in ("two", "three"):
        assert client.post("/jobs", json=BODY | {"text": text}).status_code == 201
    first = client.get("/jobs", params={"limit": 2}).json()
    assert [j["text"] for j in first["jobs"]] == ["three", "two"]
    rest = client.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["text"] for j in rest["jobs"]] == ["Hi {first_name}"]
    assert rest["next_cursor"] is None
    assert client.get("/jobs", params={"status": "cancelled"}).json()["jobs"][0]["id"] == job["id"]


def test_an_idempotency_key_gives_the_same_job_and_refuses_another_body(client, engine):
    headers = {"Idempotency-Key": "launch-7"}
    first = client.post("/jobs", json=BODY, headers=headers)
    again = client.post("/jobs", json=BODY, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and again.json()["created"] is False
    other = client.post("/jobs", json=BODY | {"text": "other"}, headers=headers)
    assert other.status_code == 409 and "text" in other.json()["detail"]
    audience = client.post("/jobs", json=BODY | {"psids": ["1001"]}, headers=headers)
    assert audience.status_code == 409 and "audience" in audience.json()["detail"]
    elsewhere = client.post("/jobs", json=BODY | {"page_id": OTHER_PAGE}, headers=headers)
    assert elsewhere.status_code == 201  # a key names one job per page
    assert _jobs(engine) == 2


def test_a_key_limited_to_a_page_sees_nothing_of_the_others(server, engine, client):
    elsewhere = client.post("/jobs", json=BODY | {"page_id": OTHER_PAGE}).json()
    scoped = {"Authorization": f"Bearer {_key(engine, 'scoped', [PAGE])}"}
    with httpx.Client(base_url=server, headers=scoped) as mine:
        own = mine.post("/jobs", json=BODY).json()
        assert mine.get(f"/jobs/{elsewhere['id']}").status_code == 404
        assert mine.post(f"/jobs/{elsewhere['id']}/cancel").status_code == 404
        assert mine.get(f"/jobs/{elsewhere['id']}/events").status_code == 404
        assert [j["id"] for j in mine.get("/jobs").json()["jobs"]] == [own["id"]]
        assert mine.get("/jobs", params={"page_id": OTHER_PAGE}).json()["jobs"] == []
        refused = mine.post("/jobs", json=BODY | {"page_id": OTHER_PAGE})
        assert refused.status_code == 422 and refused.json()["field"] == "page_id"
        for act in ("pause", "resume", "retry"):
            assert mine.post(f"/jobs/{elsewhere['id']}/{act}").status_code == 404
    assert job_row(engine, elsewhere["id"]).status == "pending"


BAD_BODIES = {
    "text of 2,001": ({"text": "x" * 2001}, "text"),
    "emoji text of 2,002 units": ({"text": "😀" * 1001}, "text"),
    "text and an image": ({"image_url": "https://x.com/a.png"}, "text"),
    "14 quick replies": ({"quick_replies": [{"title": f"q{i}"} for i in range(14)]}, "quick_replies"),
    "a button with url and payload": (
        {"buttons": [{"title": "Go", "url": "https://x.com", "payload": "GO"}]}, "button"),
    "rate 0": ({"rate_per_second": 0}, "rate_per_second"),
    "rate 100 without allow_high_volume": ({"rate_per_second": 100}, "rate"),
    "concurrency 0": ({"concurrency": 0}, "concurrency"),
    "page id with letters": ({"page_id": "abc"}, "page_id"),
    "a PSID with letters": ({"psids": ["1001", "12a"]}, None),
    "two PSIDs in one entry": ({"psids": ["1001 1002"]}, None),
    "tag without MESSAGE_TAG": ({"tag": "HUMAN_AGENT"}, "tag"),
    "MESSAGE_TAG without tag": ({"messaging_type": "MESSAGE_TAG"}, "tag"),
    "schedule in the past": ({"scheduled_at": "2020-01-01T00:00:00Z"}, "scheduled_at"),
    "schedule unreadable": ({"scheduled_at": "next tuesday"}, "scheduled_at"),
    "no audience": ({"psids": []}, None),
    "not JSON at all": ("{", None),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_bodies_get_problem_json_naming_the_field_and_write_nothing(client, engine, name):
    change, field = BAD_BODIES[name]
    if isinstance(change, str):
        answer = client.post("/jobs", content=change, headers={"Content-Type": "application/json"})
    else:
        answer = client.post("/jobs", json=BODY | change)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == PROBLEM
    problem = answer.json()
    assert problem["status"] == 422 and problem["detail"]
    if field is not None:
        assert problem["field"] == field, problem
    assert _jobs(engine) == 0


def test_an_idempotency_key_of_10_kb_is_refused(client, engine):
    answer = client.post("/jobs", json=BODY, headers={"Idempotency-Key": "k" * 10_240})
    assert answer.status_code == 422 and answer.json()["field"] == "idempotency_key"
    assert _jobs(engine) == 0


def test_a_dry_run_previews_and_writes_nothing(client, engine):
    preview = client.post("/jobs", json=BODY | {"dry_run": True, "psids": ["1001", "x"]})
    assert preview.status_code == 200
    assert (preview.json()["recipients"], preview.json()["invalid"]) == (1, 1)
    assert _jobs(engine) == 0


def test_the_schema_and_cors(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events"} <= set(schema["paths"])
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{server}/jobs", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{server}/jobs", headers=preflight | {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def _events(server: str, key: str, job_id: str) -> list[tuple[str, dict]]:
    events, kind = [], None
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("GET", f"{server}/jobs/{job_id}/events", headers=headers) as answer,
    ):
        assert answer.headers["content-type"].startswith("text/event-stream")
        async for line in answer.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


async def test_progress_streams_while_the_job_sends(server, engine, database_url, sandbox):
    key = _key(engine)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=server, headers=headers) as client:
        job = (
            await client.post("/jobs", json=BODY | {"psids": [str(2000 + i) for i in range(600)]})
        ).json()
    url, _, _ = sandbox
    watching = asyncio.create_task(_events(server, key, job["id"]))
    await asyncio.sleep(0.3)
    settings = make_settings(database_url, url)
    await run_job(engine, settings, job["id"])
    events = await asyncio.wait_for(watching, 30)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"counts"} and len(events) >= 3
    processed = [data["processed"] for _, data in events]
    assert processed == sorted(processed)
    async with httpx.AsyncClient(base_url=server, headers=headers) as client:
        final = (await client.get(f"/jobs/{job['id']}")).json()
    last = events[-1][1]
    assert last["status"] == final["status"] == "completed"
    assert {k: last[k] for k in final["counts"]} == final["counts"]
    for name in ("sent", "failed", "skipped", "unknown"):
        series = [data[name] for _, data in events]
        assert series == sorted(series), name
    async with httpx.AsyncClient(base_url=server, headers=headers) as client:
        again = await client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "600"})
    assert again.status_code == 204  # EventSource stops reconnecting to an ended job


def test_a_successful_retry_reopens_the_failures(client, engine):
    job = client.post("/jobs", json=BODY).json()
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE send_job_recipients SET status = 'failed', retryable = true "
                "WHERE job_id = :id"
            ),
            {"id": job["id"]},
        )
        connection.execute(
            sa.text(
                "UPDATE send_jobs SET status = 'completed_with_errors', failed = 3 WHERE id = :id"
            ),
            {"id": job["id"]},
        )
    retried = client.post(f"/jobs/{job['id']}/retry").json()
    assert (retried["status"], retried["counts"]["pending"], retried["counts"]["failed"]) == (
        "pending",
        3,
        0,
    )


async def test_a_stream_closes_when_its_key_is_revoked(server, engine, monkeypatch):
    monkeypatch.setattr(progress, "KEY_CHECK_SECONDS", 0.5)
    key = _key(engine, "watcher")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=server, headers=headers, timeout=30) as client:
        job = (await client.post("/jobs", json=BODY)).json()  # pending: its stream never ends
        watching = asyncio.create_task(_events(server, key, job["id"]))
        await asyncio.sleep(1.5)
        with db.session_scope(engine) as session:
            apikeys.revoke_key(session, name_or_key_id="watcher")
        events = await asyncio.wait_for(watching, 10)
    assert events and {kind for kind, _ in events} == {"counts"}
