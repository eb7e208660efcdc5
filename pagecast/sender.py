"""One chunk's sends: every claimed recipient called within the chunk's share of the job's
concurrency and the page's rate, each call written ahead and its answer handed to the recorder,
with retries that tell transient failures, throttling and outages apart (see ``ChunkSender``).
"""

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from pagecast import attachments
from pagecast.content import Content
from pagecast.errors import (
    AmbiguousDelivery,
    GraphError,
    JobFatalGraphError,
    RecipientGraphError,
    ThrottledError,
    TransientGraphError,
)
from pagecast.faults import crash_point
from pagecast.graph import OUTSIDE_WINDOW, GraphClient
from pagecast.models import MessagingType, RecipientStatus, SendJob
from pagecast.outages import OutageWatch
from pagecast.ratelimit import Pacer
from pagecast.recipients import Claimed, Outcome
from pagecast.recorder import Recorder
from pagecast.text import text_length
from pagecast.validation import render_text, text_limit

TRANSIENT_TRIES = 6
UNEXPECTED_ERROR_TRIES = 4  # code 2 also means "the user blocked the page": only a few tries
THROTTLE_TRIES = 20
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 4.0
_log = logging.getLogger(__name__)
TEXT_TOO_LONG = "rendered_text_too_long"


def _backoff(tries: int) -> float:
    return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (tries - 1)) * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
class _Retry:
    error: GraphError
    throttled: bool


class ChunkSender:
    """Sends one chunk's claimed recipients within its share of the job's concurrency and the
    page's rate, every call written ahead (``recorder.mark``) and its answer handed back.

    Throttled calls wait for the page's slowed-down schedule; other transient failures back off
    exponentially (with jitter), up to ``TRANSIENT_TRIES`` calls (``UNEXPECTED_ERROR_TRIES`` code 2
    answers), then fail as retryable — except during an outage of the Send API
    (``pagecast.outages``), which holds the page and costs nobody a try until it has lasted
    ``outage_pause_after`` seconds: then the job pauses. A job-fatal error, a stop of the run
    (pause, cancel, lost lease, a database it cannot record in) ends the chunk: recipients not
    called go back to ``pending``. One recipient's failure, of any kind, never costs another its
    outcome."""

    def __init__(
        self,
        *,
        job: SendJob,
        client: GraphClient,
        pacer: Pacer,
        outage: OutageWatch,
        recorder: Recorder,
        concurrency: int,
        mark_ahead: int,
        outage_pause_after: float = 300.0,
        attachment: attachments.Upload | None = None,
    ) -> None:
        self._job = job
        self._attachment = attachment
        self._client = client
        self._pacer = pacer
        self._outage = outage
        self._outage_pause_after = outage_pause_after
        self._recorder = recorder
        self._permits = asyncio.Semaphore(concurrency)
        self._ahead = asyncio.Semaphore(mark_ahead)
        self.fatal: JobFatalGraphError | None = None
        self.outage_error: GraphError | None = None
        self.upload_error: GraphError | None = None
        self._started = outage.now()
        self.error: BaseException | None = None
        self.outcomes: list[Outcome] = []

    def _stopping(self) -> bool:
        return self.fatal is not None or self._outage_too_long() or self._recorder.stopping

    def _outage_too_long(self) -> bool:
        """The page's outage, seen by any chunk of this process, has lasted past the limit while
        this chunk ran (a resumed job waits it out again before it pauses again)."""
        if (
            self.outage_error is None
            and self._outage.failing_for(since=self._started) > self._outage_pause_after
        ):
            self.outage_error = self._outage.last_failure
        return self.outage_error is not None

    async def _attachment_id(self, claimed: list[Claimed]) -> str | None:
        """The job's uploaded attachment (``None`` without one). When there is none to send (the
        upload failed, or the job stopped while another chunk uploaded), every claimed recipient
        goes back to ``pending``: Meta refusing the file stops the job ``failed``, transient
        failures ``paused`` (``upload_error``)."""
        if self._attachment is None:
            return None
        try:
            uploaded = await self._attachment()
        except (JobFatalGraphError, TransientGraphError, AmbiguousDelivery) as error:
            if isinstance(error, JobFatalGraphError):
                self.fatal = error
            else:
                self.upload_error = error
            uploaded = None
        except BaseException:
            self._give_back(claimed)
            raise
        if uploaded is None:
            self._give_back(claimed)
        return uploaded

    def _give_back(self, claimed: list[Claimed]) -> None:
        for recipient in claimed:
            self._settle(Outcome(recipient.psid, RecipientStatus.PENDING))

    def _settle(self, outcome: Outcome) -> None:
        self._recorder.record(outcome)
        if outcome.status != RecipientStatus.CLAIMED:
            self.outcomes.append(outcome)

    async def _attempt(self, recipient: Claimed, message: dict[str, Any]) -> Outcome | _Retry:
        job, psid = self._job, recipient.psid
        try:
            result = await self._client.send_message(
                page_id=job.page_id,
                psid=psid,
                message=message,
                messaging_type=job.messaging_type,
                tag=job.tag,
            )
        except ThrottledError as exc:
            self._outage.answered()
            await self._advise(self._pacer.throttled(exc.retry_after))
            return _Retry(exc, throttled=True)
        except TransientGraphError as exc:
            await self._failed(psid, exc)
            return _Retry(exc, throttled=False)
        except AmbiguousDelivery as exc:
            await self._failed(psid, exc)
            if job.resend_unknown:
                return Outcome(psid, RecipientStatus.PENDING)
            return Outcome(psid, RecipientStatus.UNKNOWN, error=exc)
        except RecipientGraphError as exc:
            self._outage.answered()
            status = RecipientStatus.SKIPPED if exc.skip_reason else RecipientStatus.FAILED
            return Outcome(psid, status, error=exc, reason=exc.skip_reason)
        except JobFatalGraphError as exc:
            self._outage.answered()
            self.fatal = self.fatal or exc
            return Outcome(psid, RecipientStatus.PENDING)
        crash_point("answer")
        self._outage.answered()
        await self._advise(self._pacer.observe_usage(result.usage_percent))
        return Outcome(psid, RecipientStatus.SENT, message_id=result.message_id)

    async def _failed(self, psid: str, error: GraphError) -> None:
        """A call failed without an answer from Meta: hold the page when that makes an outage
        (the chunk stops once the outage has lasted too long: ``_stopping``)."""
        hold = self._outage.failed(psid, error)
        if hold is not None:
            _log.warning(
                "page %s: the Send API fails every call (%s); holding sends for %.0f s",
                self._job.page_id,
                error.code_key,
                hold,
            )
            await self._advise(self._pacer.hold(hold))

    async def _advise(self, slowing: Awaitable[None]) -> None:
        """Slow the page down; a failure to do so (the database) never costs the answer."""
        try:
            await slowing
        except Exception as error:
            _log.warning(
                "job %s: could not slow page %s down: %s", self._job.id, self._job.page_id, error
            )

    async def _call(self, recipient: Claimed, message: dict[str, Any]) -> Outcome | _Retry | None:
        """Mark, wait for the slot and a connection, call; ``None`` when the chunk stopped first
        (the row was not called)."""
        async with self._ahead:
            if self._stopping() or not await self._recorder.mark(recipient.psid):
                return None
            await self._pacer.wait_for_slot()
            slot_passed_at = time.monotonic()
            await self._permits.acquire()
        try:
            if time.monotonic() - slot_passed_at > 1.0 / self._job.rate_per_second:
                self._pacer.expect(1)
                await self._pacer.wait_for_slot()  # waited for a connection: no burst
            if self._stopping():
                return None
            return await self._attempt(recipient, message)
        finally:
            self._permits.release()

    async def _deliver(self, recipient: Claimed, message: dict[str, Any]) -> None:
        transient = unexpected = throttled = 0
        while True:
            result = await self._call(recipient, message)
            if result is None:
                return self._settle(Outcome(recipient.psid, RecipientStatus.PENDING))
            if isinstance(result, Outcome):
                return self._settle(result)
            if result.throttled:
                throttled += 1
                exhausted, wait = throttled >= THROTTLE_TRIES, 0.0
            elif self._outage.failing_for():  # the page is held: this try costs nothing
                exhausted, wait = False, _backoff(1)
            else:
                transient += 1
                unexpected += result.error.code == 2
                exhausted = transient >= TRANSIENT_TRIES or unexpected >= UNEXPECTED_ERROR_TRIES
                wait = _backoff(transient)
            if exhausted:
                failed = Outcome(
                    recipient.psid, RecipientStatus.FAILED, error=result.error, retryable=True
                )
                return self._settle(failed)
            self._settle(Outcome(recipient.psid, RecipientStatus.CLAIMED))
            self._pacer.expect(1)
            await asyncio.sleep(wait)

    async def _guarded(self, recipient: Claimed, message: dict[str, Any]) -> None:
        try:
            await self._deliver(recipient, message)
        except Exception as error:  # not a call's failure (those are Graph errors): not sent
            self.error = self.error or error
            self._settle(Outcome(recipient.psid, RecipientStatus.PENDING))

    async def run(self, claimed: list[Claimed]) -> None:
        """Send to every claimed recipient that needs a call and hand every outcome to the
        recorder; re-raises the first unexpected error after every recipient is settled."""
        job = self._job
        windowed = job.messaging_type != MessagingType.MESSAGE_TAG
        content = Content.from_json(job.content)
        limit = text_limit(content)
        attachment_id = await self._attachment_id(claimed)
        if self._attachment is not None and attachment_id is None:
            return
        to_send = []
        for recipient in claimed:
            text = None
            if job.text is not None:
                names = {"first_name": recipient.first_name, "last_name": recipient.last_name}
                text = render_text(job.text, **names)
            if windowed and recipient.outside_window:
                self._settle(
                    Outcome(recipient.psid, RecipientStatus.SKIPPED, reason=OUTSIDE_WINDOW)
                )
            elif text is not None and text_length(text) > limit:
                self._settle(Outcome(recipient.psid, RecipientStatus.FAILED, reason=TEXT_TOO_LONG))
            else:
                to_send.append((recipient, content.message(text, attachment_id=attachment_id)))
        self._pacer.expect(len(to_send))
        await asyncio.gather(*(self._guarded(r, message) for r, message in to_send))
        if self.error is not None:
            raise self.error
