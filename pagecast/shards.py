"""Large jobs in shards: disjoint PSID ranges that child runs send under their own leases.

The job's own run keeps the job's lease and supervises: it splits a job with more than
``shard_size`` pending recipients into ranges, starts a child run per range, restarts ranges whose
child stopped heartbeating, and settles the job when every range is done. Every child draws from
the page's one send schedule, so the page's rate holds however many workers send."""

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session

from pagecast.leases import Lease, lease_params
from pagecast.recipients import cancel_pending, release
from pagecast.repo import get_job

_SPLIT_POINTS = sa.text(
    """
    SELECT psid FROM (
        SELECT psid, row_number() OVER (ORDER BY psid) AS n, count(*) OVER () AS total
        FROM send_job_recipients WHERE job_id = :job_id AND status = 'pending'
    ) numbered
    WHERE n % :size = 0 OR n = total
    ORDER BY psid
    """
)
_CLAIM = sa.text(
    """
    UPDATE send_job_shards s SET status = 'running', lease_owner = :owner,
        attempt = s.attempt + 1, heartbeat_at = now()
    FROM send_jobs j
    WHERE s.job_id = :job_id AND s.shard = :shard AND j.id = s.job_id
      AND j.status = 'running' AND NOT j.cancel_requested
      AND (s.status = 'pending'
           OR (s.status = 'running' AND s.heartbeat_at < now() - make_interval(secs => :lease_seconds)))
    RETURNING s.attempt, s.psid_after, s.psid_last
    """
)
_STATE = sa.text(
    """
    SELECT shard, attempt, status,
           status = 'running' AND heartbeat_at < now() - make_interval(secs => :lease_seconds)
    FROM send_job_shards WHERE job_id = :job_id ORDER BY shard
    """
)


@dataclass(frozen=True)
class ShardLease:
    """A child run's hold on one range of a job."""

    lease: Lease
    after: str
    last: str


@dataclass(frozen=True)
class ShardPlan:
    """What the supervising run sees: ranges to (re)start as ``(shard, attempt)``, ranges being
    sent right now, and ranges not done yet."""

    to_start: list[tuple[int, int]]
    running: int
    unfinished: int


def ensure_shards(session: Session, *, job_id: uuid.UUID, shard_size: int) -> int:
    """Split the job into ranges of about ``shard_size`` pending recipients, once; returns how many
    ranges it has (0: small enough to send in one run)."""
    existing = session.execute(
        sa.text("SELECT count(*) FROM send_job_shards WHERE job_id = :job_id"), {"job_id": job_id}
    ).scalar_one()
    if existing:
        return existing
    points = session.execute(_SPLIT_POINTS, {"job_id": job_id, "size": shard_size}).scalars().all()
    if len(points) <= 1:
        return 0
    rows = [
        {"job_id": job_id, "shard": index, "after": after, "last": last}
        for index, (after, last) in enumerate(zip(["", *points[:-1]], points, strict=True))
    ]
    session.execute(
        sa.text(
            "INSERT INTO send_job_shards (job_id, shard, psid_after, psid_last) "
            "VALUES (:job_id, :shard, :after, :last)"
        ),
        rows,
    )
    return len(rows)


def plan(session: Session, *, job_id: uuid.UUID, lease_seconds: int) -> ShardPlan:
    """The supervising run's view of the job's ranges."""
    rows = session.execute(_STATE, {"job_id": job_id, "lease_seconds": lease_seconds}).all()
    return ShardPlan(
        to_start=[
            (shard, attempt)
            for shard, attempt, status, stale in rows
            if status == "pending" or stale
        ],
        running=sum(1 for _, _, status, stale in rows if status == "running" and not stale),
        unfinished=sum(1 for _, _, status, _ in rows if status != "done"),
    )


def claim_shard(
    session: Session, *, job_id: uuid.UUID, shard: int, owner: str, lease_seconds: int
) -> ShardLease | None:
    """Take a range that is pending, or running under an expired lease, of a running job; recipients
    its previous child left claimed or sending are settled as on any takeover."""
    row = session.execute(
        _CLAIM,
        {"job_id": job_id, "shard": shard, "owner": owner, "lease_seconds": lease_seconds},
    ).first()
    if row is None:
        return None
    attempt, after, last = row
    release(session, job_id=job_id, after=after, last=last, shard=shard)
    lease = Lease(job_id=job_id, owner=owner, attempt=attempt, shard=shard)
    return ShardLease(lease=lease, after=after, last=last)


def finish_shard(session: Session, *, shard: ShardLease) -> None:
    """Release the range: ``done`` when nothing in it is pending, else ``pending`` again. A child
    that lost its range changes nothing; in a cancelled job, what it gave back is skipped."""
    params = lease_params(shard.lease) | {"after": shard.after, "last": shard.last}
    held = session.execute(
        sa.text(
            "SELECT 1 FROM send_job_shards WHERE job_id = :job_id AND shard = :shard "
            "AND lease_owner = :owner AND attempt = :attempt FOR UPDATE"
        ),
        params,
    ).first()
    if held is None:
        return
    release(
        session,
        job_id=shard.lease.job_id,
        after=shard.after,
        last=shard.last,
        shard=shard.lease.shard,
    )
    if get_job(session, job_id=shard.lease.job_id).cancel_requested:
        cancel_pending(session, job_id=shard.lease.job_id)
    session.execute(
        sa.text(
            """
            UPDATE send_job_shards SET lease_owner = NULL, heartbeat_at = NULL,
                status = CASE WHEN EXISTS (
                    SELECT 1 FROM send_job_recipients r WHERE r.job_id = :job_id
                      AND r.status = 'pending' AND r.psid > :after AND r.psid <= :last
                ) THEN 'pending' ELSE 'done' END
            WHERE job_id = :job_id AND shard = :shard
            """
        ),
        params,
    )


def release_stale(session: Session, *, job_id: uuid.UUID, lease_seconds: int) -> int:
    """Give back ranges whose child stopped heartbeating, so that finishing the job settles the
    recipients those children left ``sending``."""
    return session.execute(
        sa.text(
            "UPDATE send_job_shards SET status = 'pending', lease_owner = NULL, heartbeat_at = NULL "
            "WHERE job_id = :job_id AND status = 'running' "
            "AND heartbeat_at < now() - make_interval(secs => :lease_seconds)"
        ),
        {"job_id": job_id, "lease_seconds": lease_seconds},
    ).rowcount
