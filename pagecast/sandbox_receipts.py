"""The sandbox's Messenger webhooks: delivery and read receipts for a share of its deliveries,
posted to a webhook URL and signed with the app secret as Meta signs them.

Like Meta's, they come late and batched (every ``_BATCH_SECONDS``, one entry per page), out of order
(each waits a random delay up to ``receipt_delay_ms``, a read a little longer than its delivery),
some twice (``receipt_duplicate_rate``), and are retried while the receiver does not answer 200.
"""

import asyncio
import heapq
import itertools
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import aiohttp

from pagecast.webhooks import SIGNATURE_HEADER, signature

_BATCH_SECONDS = 0.05
_MAX_BATCH = 500
_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class ReceiptSettings:
    """Where receipts go and how many: shares are fractions between 0 and 1."""

    url: str
    secret: str
    delivery_rate: float = 1.0
    read_rate: float = 0.5
    duplicate_rate: float = 0.05
    delay_ms: float = 500.0


class ReceiptPoster:
    """Queues receipts for deliveries (``delivered``) and posts them from the sandbox's loop."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._due: list[tuple[float, int, str, dict[str, Any]]] = []
        self._order = itertools.count()
        self.counts: Counter[str] = Counter()

    def delivered(self, settings: ReceiptSettings, page_id: str, psid: str, at: float) -> None:
        """Queue the receipts of one message delivered to ``psid`` at ``at`` (epoch seconds)."""
        if not page_id.isdigit() or self._rng.random() >= settings.delivery_rate:
            return
        kinds = ["delivery"] + (["read"] if self._rng.random() < settings.read_rate else [])
        for kind in kinds:
            watermark = at + (self._rng.uniform(0.05, 0.5) if kind == "read" else 0.0)
            event = {
                "sender": {"id": psid},
                "recipient": {"id": page_id},
                "timestamp": int(watermark * 1000),
                kind: {"watermark": int(watermark * 1000)},
            }
            copies = 2 if self._rng.random() < settings.duplicate_rate else 1
            for _ in range(copies):
                delay = self._rng.uniform(0, settings.delay_ms) / 1000
                heapq.heappush(
                    self._due, (time.monotonic() + delay, next(self._order), page_id, event)
                )
            self.counts[f"{kind}_queued"] += copies

    @property
    def waiting(self) -> int:
        """Receipts queued and not yet accepted by the receiver."""
        return len(self._due)

    async def run(self, settings_of: Any) -> None:
        """Post due receipts in batches, forever; ``settings_of()`` gives the current settings
        (``None``: receipts off)."""
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(_BATCH_SECONDS)
                settings = settings_of()
                if settings is not None and self._due:
                    await self._post_due(session, settings)

    async def _post_due(self, session: aiohttp.ClientSession, settings: ReceiptSettings) -> None:
        now = time.monotonic()
        batch = []
        while self._due and self._due[0][0] <= now and len(batch) < _MAX_BATCH:
            batch.append(heapq.heappop(self._due))
        if not batch:
            return
        pages: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for _, _, page_id, event in batch:
            pages[page_id].append(event)
        entries = [
            {"id": p, "time": int(time.time() * 1000), "messaging": e} for p, e in pages.items()
        ]
        body = json.dumps({"object": "page", "entry": entries}).encode()
        headers = {SIGNATURE_HEADER: signature(settings.secret, body)}
        try:
            async with session.post(settings.url, data=body, headers=headers) as answer:
                accepted = answer.status == 200
        except aiohttp.ClientError:
            accepted = False
        if accepted:
            self.counts["posted"] += len(batch)
            return
        self.counts["post_failures"] += 1
        retry_at = time.monotonic() + _RETRY_SECONDS
        for _, order, page_id, event in batch:
            heapq.heappush(self._due, (retry_at, order, page_id, event))
