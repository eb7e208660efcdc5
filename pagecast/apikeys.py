"""Keys of the HTTP job API: created with a name and, optionally, the pages they may see; shown
once (``pck_<key id>_<secret>``) and stored as a SHA-256 hash (a random 256-bit secret needs no
slow hash); checked in constant time; revoked by name or key id.

A key limited to pages sees only those pages' jobs: another page's job is "not found" to it, so a
key cannot even learn which job ids exist elsewhere.
"""

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from pagecast.errors import InvalidField, JobNotFound
from pagecast.models import ApiKey, SendJob
from pagecast.validation import validate_page_id

PREFIX = "pck"
_KEY = re.compile(rf"{PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})")
_MAX_NAME = 100
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, name: str, page_ids: Sequence[str] = ()) -> tuple[ApiKey, str]:
    """A new key and its plaintext (shown once, never stored)."""
    name = name.strip()
    if not name or len(name) > _MAX_NAME:
        raise InvalidField("name", f"must be 1–{_MAX_NAME} characters", limit=_MAX_NAME)
    if session.exec(select(ApiKey).where(ApiKey.name == name)).first() is not None:
        raise InvalidField("name", f"a key named {name!r} exists already")
    pages = sorted({validate_page_id(page) for page in page_ids})
    key_id = secrets.token_hex(6)
    plaintext = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    key = ApiKey(name=name, key_id=key_id, key_hash=_hash(plaintext), page_ids=pages)
    session.add(key)
    session.flush()
    return key, plaintext


def authenticate(session: Session, presented: str) -> ApiKey | None:
    """The live key ``presented`` is, or ``None``; the hash comparison runs whether or not its key
    id exists, in constant time."""
    match = _KEY.fullmatch(presented)
    key = None
    if match is not None:
        key = session.exec(select(ApiKey).where(ApiKey.key_id == match.group(1))).first()
    stored = key.key_hash if key is not None else _DUMMY_HASH
    if not hmac.compare_digest(_hash(presented), stored) or key is None or key.revoked_at:
        return None
    session.execute(  # at most once a minute: many viewers connecting share one row
        sa.text(
            "UPDATE api_keys SET last_used_at = now() WHERE id = :id "
            "AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')"
        ),
        {"id": key.id},
    )
    return key


def revoke_key(session: Session, *, name_or_key_id: str) -> ApiKey:
    """Revoke the key with that name or key id; ``InvalidField`` when there is none."""
    key = session.exec(
        select(ApiKey).where((ApiKey.name == name_or_key_id) | (ApiKey.key_id == name_or_key_id))
    ).first()
    if key is None:
        raise InvalidField("key", f"no API key named {name_or_key_id!r}")
    key.revoked_at = key.revoked_at or datetime.now(UTC)
    session.add(key)
    session.flush()
    return key


def list_keys(session: Session) -> Sequence[ApiKey]:
    """Every key, newest first (hashes included: callers show the rest)."""
    return session.exec(select(ApiKey).order_by(col(ApiKey.created_at).desc())).all()


def may_see(key: ApiKey, page_id: str) -> bool:
    """Whether ``key`` may see and act on ``page_id``'s jobs."""
    return not key.page_ids or page_id in key.page_ids


def visible_job(session: Session, key: ApiKey, job_id: object) -> SendJob:
    """The job, when the key may see it; ``JobNotFound`` otherwise (also for another page's)."""
    job = session.get(SendJob, job_id)
    if job is None or not may_see(key, job.page_id):
        raise JobNotFound(job_id)
    return job
