import json

import pytest

from pagecast.sandbox import SandboxConfig, running_sandbox
from tests.engine import (
    assert_counters_match_rows,
    create_job,
    job_row,
    make_settings,
    recipient_counts,
    run_job,
)


@pytest.fixture
def sandbox(tmp_path):
    config = SandboxConfig(ledger_path=tmp_path / "ledger.jsonl", seed=3)
    with running_sandbox(config) as (url, state):
        yield url, state, tmp_path / "ledger.jsonl"


def _ledger(path):
    state_lines = path.read_text().splitlines()
    return [json.loads(line) for line in state_lines]


async def test_sends_every_recipient_exactly_once(engine, database_url, sandbox):
    url, state, ledger = sandbox
    job = create_job(engine, 2000)
    finished = await run_job(engine, make_settings(database_url, url), job.id)
    assert finished.status == "completed"
    assert (finished.sent, finished.failed) == (2000, 0)
    assert state.stats()["duplicates"] == 0
    psids = [r["psid"] for r in _ledger(ledger)]
    assert len(psids) == len(set(psids)) == 2000
    assert recipient_counts(engine, job.id) == {"sent": 2000}
    assert_counters_match_rows(engine, job.id)
    assert state.stats()["token_via"] == {"header": 2000}
