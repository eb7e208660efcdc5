"""The lease: proof that a runner owns a job (or one range of a sharded job), and the SQL fence that
every write of that runner carries, so a runner that lost its lease can neither write nor send."""

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Lease:
    """A runner's hold on a job (``shard`` set: on one range of it)."""

    job_id: uuid.UUID
    owner: str
    attempt: int
    shard: int | None = None


def fence_sql(lease: Lease, table: str = "send_jobs") -> str:
    """The SQL condition on a ``send_jobs`` row (named ``table``) that holds only while ``lease``
    does; bind it with ``lease_params``."""
    if lease.shard is None:
        return (
            f"{table}.id = :job_id AND {table}.lease_owner = :owner AND {table}.attempt = :attempt"
        )
    return (
        f"{table}.id = :job_id AND EXISTS (SELECT 1 FROM send_job_shards s WHERE s.job_id = :job_id "
        "AND s.shard = :shard AND s.lease_owner = :owner AND s.attempt = :attempt "
        "AND s.status = 'running')"
    )


def lease_params(lease: Lease) -> dict[str, object]:
    """The bind parameters of ``fence_sql``."""
    return {
        "job_id": lease.job_id,
        "owner": lease.owner,
        "attempt": lease.attempt,
        "shard": lease.shard,
    }
