"""A local stand-in for Meta's Messenger Send API, for the demo, tests and benchmarks.

It speaks ``POST /{version}/{page_id}/messages`` and ``/{version}/me/messages`` with Meta's request
validation and error bodies, and injects faults on demand: latency and jitter, a per-page rate limit
(code 613), transient faults (HTTP 500, codes 1/2), permanent per-PSID faults (551,
100/2018001), outside-window faults (10/2018278), token revocation after N sends (190), and
ambiguous faults (the message is delivered, then the connection drops), and a reported
``X-Page-Usage`` percentage. Named faults (``FAULTS``) play what can go wrong between pagecast
and Meta: per PSID through ``fail_psids``, for the next ``outage_calls`` calls, or for every
call until ``outage_until`` (a storm). Given a webhook URL and secret, it posts signed delivery
and read receipts for a share of its deliveries (``pagecast.sandbox_receipts``).
Every delivery is appended to a JSONL ledger; ``GET /__stats`` reports counters (the URLs called
included), ``POST /__config`` changes the faults and ``POST /__reset`` clears the counters.
"""

import asyncio
import json
import random
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Container, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from aiohttp import web

from pagecast.models import MessageTag, MessagingType
from pagecast.sandbox_messages import invalid_message, invalid_upload, ledger_text
from pagecast.sandbox_receipts import ReceiptPoster, ReceiptSettings

_LEDGER_FLUSH_SECONDS = 0.2
_WINDOW_SECONDS = 1.0
_FAULT_BUCKETS = 10_000
# name → (whether the message is delivered first, what the call gets)
FAULTS = {
    "transient": (False, "HTTP 500, Graph error 2 (is_transient)"),
    "throttle_429": (False, "HTTP 429 with Retry-After: retry_after_seconds, no Graph body"),
    "html_503": (False, "HTTP 503, an HTML page"),
    "html_502": (True, "HTTP 502, an HTML page (a gateway lost Meta's answer)"),
    "malformed": (True, "HTTP 200, a truncated JSON body"),
    "empty": (True, "HTTP 200, an empty body"),
    "hang": (True, "no answer for hang_seconds, then the usual one"),
    "reset": (False, "the connection is reset after the request arrived"),
}


@dataclass
class SandboxConfig:
    """Fault injection settings; rates are fractions between 0 and 1."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_limit_per_page: int | None = None
    transient_rate: float = 0.0
    permanent_rate: float = 0.0
    outside_window_rate: float = 0.0
    ambiguous_rate: float = 0.0
    revoke_after: int | None = None
    usage_percent: float | None = None
    fail_psids: dict[str, str] = field(default_factory=dict)
    outage_until: float | None = None
    outage_calls: int = 0
    outage_fault: str = "transient"
    retry_after_seconds: float = 2.0
    hang_seconds: float = 60.0
    valid_tokens: list[str] = field(default_factory=list)
    ledger_path: Path | None = None
    seed: int | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    delivery_receipt_rate: float = 1.0
    read_receipt_rate: float = 0.5
    receipt_duplicate_rate: float = 0.05
    receipt_delay_ms: float = 500.0
    upload_failures: int = 0  # the next uploads answered with a transient error (HTTP 500)

    def receipt_settings(self) -> ReceiptSettings | None:
        """Where and how the sandbox posts receipts; ``None`` without a webhook URL and secret."""
        if not (self.webhook_url and self.webhook_secret):
            return None
        return ReceiptSettings(
            url=self.webhook_url,
            secret=self.webhook_secret,
            delivery_rate=self.delivery_receipt_rate,
            read_rate=self.read_receipt_rate,
            duplicate_rate=self.receipt_duplicate_rate,
            delay_ms=self.receipt_delay_ms,
        )

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (field name → value); unknown names raise ``KeyError``, an unknown
        ``outage_fault`` ``ValueError``."""
        names = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in names:
                raise KeyError(name)
            if name == "outage_fault" and value not in FAULTS:
                raise ValueError(f"unknown fault {value!r}; known: {', '.join(FAULTS)}")
            setattr(self, name, Path(value) if name == "ledger_path" and value else value)


@dataclass
class _PageWindow:
    calls: deque[float] = field(default_factory=deque)
    deliveries: deque[float] = field(default_factory=deque)
    delivered: int = 0
    max_per_second: int = 0


def _graph_error(
    status: int, code: int, message: str, *, subcode: int | None = None, transient: bool = False
) -> web.Response:
    error: dict[str, Any] = {
        "message": message,
        "type": "OAuthException",
        "code": code,
        "is_transient": transient,
        "fbtrace_id": uuid.uuid4().hex[:11],
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return web.json_response({"error": error}, status=status)


def _in_bucket(psid: str, salt: str, rate: float) -> bool:
    return (
        rate > 0 and zlib.crc32(f"{salt}:{psid}".encode()) % _FAULT_BUCKETS < rate * _FAULT_BUCKETS
    )


def _slide(window: deque[float], now: float) -> None:
    while window and now - window[0] >= _WINDOW_SECONDS:
        window.popleft()


class Sandbox:
    """The sandbox's state and request handling; ``app()`` builds the aiohttp application."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._ledger: Any = None
        self._flusher: asyncio.Task[None] | None = None
        self.receipts = ReceiptPoster(random.Random(config.seed))
        self._poster: asyncio.Task[None] | None = None
        self.reset()

    def reset(self) -> None:
        """Clear counters, windows, revocations and the delivered set (the ledger file stays)."""
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.first_fault_at: dict[str, float] = {}
        self.token_via: Counter[str] = Counter()
        self.urls: Counter[str] = Counter()
        self.pages: defaultdict[str, _PageWindow] = defaultdict(_PageWindow)
        self.delivered_once: set[tuple[str, str]] = set()
        self.duplicates = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.revoked: set[str] = set()
        self.uploads: dict[str, str] = {}
        self.upload_calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/{version}/{page_id}/messages", self.handle_send),
                web.post("/{page_id:[0-9]+|me}/messages", self.handle_send),
                web.post("/{version}/{page_id}/message_attachments", self.handle_upload),
                web.get("/__stats", self.handle_stats),
                web.post("/__config", self.handle_config),
                web.post("/__reset", self.handle_reset),
            ]
        )
        app.on_startup.append(self._open_ledger)
        app.on_cleanup.append(self._close_ledger)
        return app

    async def _open_ledger(self, app: web.Application) -> None:
        self._poster = asyncio.create_task(self.receipts.run(self.config.receipt_settings))
        if self.config.ledger_path is not None:
            self._ledger = self.config.ledger_path.open("a", encoding="utf-8")
            self._flusher = asyncio.create_task(self._flush_periodically())

    async def _close_ledger(self, app: web.Application) -> None:
        for task in (self._flusher, self._poster):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(_LEDGER_FLUSH_SECONDS)
            self._ledger.flush()

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset."""
        if self._ledger is not None:
            self._ledger.flush()
        return {
            "requests": self.requests,
            "delivered": sum(p.delivered for p in self.pages.values()),
            "duplicates": self.duplicates,
            "max_in_flight": self.max_in_flight,
            "errors": dict(self.errors),
            "faults": dict(self.faults),
            "first_fault_at": self.first_fault_at.copy(),
            "token_via": dict(self.token_via),
            "uploads": len(self.uploads),
            "upload_calls": self.upload_calls,
            "receipts": dict(self.receipts.counts) | {"waiting": self.receipts.waiting},
            "urls": dict(self.urls),
            "pages": {
                page: {"delivered": w.delivered, "max_per_second": w.max_per_second}
                for page, w in self.pages.items()
            },
        }

    async def handle_upload(self, request: web.Request) -> web.Response:
        """The Attachment Upload API: a reusable attachment by URL gets an ``attachment_id``."""
        self.urls[request.path_qs] += 1
        try:
            body, token = await self._read(request)
        except (ValueError, json.JSONDecodeError):
            return _graph_error(400, 100, "(#100) The request body could not be parsed")
        if token is None or token in self.revoked:
            return _graph_error(400, 190, "Error validating access token", subcode=460)
        self.upload_calls += 1
        if self.config.upload_failures:
            self.config.upload_failures -= 1
            return _graph_error(500, 2, "Service temporarily unavailable", transient=True)
        invalid = invalid_upload(body)
        if invalid is not None:
            self.errors["upload 100"] += 1
            return _graph_error(400, 100, invalid)
        attachment_id = str(10**15 + len(self.uploads))
        self.uploads[attachment_id] = body["message"]["attachment"]["payload"]["url"]
        return web.json_response({"attachment_id": attachment_id})

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def handle_config(self, request: web.Request) -> web.Response:
        try:
            self.config.update(await request.json())
        except KeyError as exc:
            return web.json_response({"error": f"unknown setting {exc}"}, status=400)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.config), dumps=lambda v: json.dumps(v, default=str))

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        if request.content_type == "application/json":
            body = await request.json()
        else:
            form = await request.post()
            body = {k: form[k] for k in form}
            for key in ("recipient", "message"):
                if isinstance(body.get(key), str):
                    body[key] = json.loads(body[key])
        auth = request.headers.get("Authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if body.get("access_token"):
            self.token_via["body"] += 1
            return body, str(body["access_token"])
        if scheme.lower() in ("bearer", "oauth") and credentials:
            self.token_via["header"] += 1
            return body, credentials
        if request.query.get("access_token"):
            self.token_via["query"] += 1
            return body, request.query["access_token"]
        return body, None

    async def handle_send(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()  # rate windows count calls as they arrive, as Meta does
        self.requests += 1
        self.urls[request.path_qs] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            config = self.config
            if config.latency_ms or config.jitter_ms:
                delay = config.latency_ms + self._rng.uniform(-config.jitter_ms, config.jitter_ms)
                await asyncio.sleep(max(delay, 0.0) / 1000)
            response = await self._respond(request, arrived)
        finally:
            self.in_flight -= 1
        if response is not None and response.status != 200:
            self.errors[_error_key(response)] += 1
        return response if response is not None else web.Response()

    async def _respond(self, request: web.Request, now: float) -> web.Response | None:
        try:
            body, token = await self._read(request)
        except ConnectionResetError:  # the client went away mid-request: nobody to answer
            return None
        except (ValueError, json.JSONDecodeError):
            return _graph_error(400, 100, "(#100) The request body could not be parsed")
        if token is None:
            return _graph_error(400, 104, "An access token is required to request this resource.")
        if token in self.revoked or (
            self.config.valid_tokens and token not in self.config.valid_tokens
        ):
            return _graph_error(
                400,
                190,
                "Error validating access token: The session has been invalidated.",
                subcode=460,
            )
        invalid = _invalid_payload(body, self.uploads)
        if invalid is not None:
            return _graph_error(400, 100, invalid)
        page_id = request.match_info["page_id"]
        psid = str(body["recipient"]["id"])
        window = self.pages[page_id]
        _slide(window.calls, now)
        window.calls.append(now)
        limit = self.config.rate_limit_per_page
        if limit is not None and len(window.calls) > limit:
            return _graph_error(
                400, 613, "(#613) Calls to this api have exceeded the rate limit.", transient=True
            )
        fault = self._fault(psid)
        if isinstance(fault, web.Response):
            return fault
        message_id = f"m_{uuid.uuid4().hex}"
        if fault is not None:
            self.faults[fault] += 1
            self.first_fault_at.setdefault(fault, time.time())
            delivers, _ = FAULTS[fault]
            if delivers:
                self._deliver(window, now, page_id, psid, body["message"], message_id, token)
            if fault != "hang":
                return self._named_fault(request, fault)
            await asyncio.sleep(self.config.hang_seconds)
        else:
            self._deliver(window, now, page_id, psid, body["message"], message_id, token)
        if self.config.ambiguous_rate and self._rng.random() < self.config.ambiguous_rate:
            if request.transport is not None:
                request.transport.abort()
            return None
        headers = {}
        if self.config.usage_percent is not None:
            usage = {"call_count": self.config.usage_percent, "total_cputime": 1, "total_time": 1}
            headers["X-Page-Usage"] = json.dumps(usage)
        return web.json_response({"recipient_id": psid, "message_id": message_id}, headers=headers)

    def _named_fault(self, request: web.Request, fault: str) -> web.Response | None:
        if fault == "transient":
            return _graph_error(500, 2, "An unexpected error has occurred.", transient=True)
        if fault == "throttle_429":
            headers = {"Retry-After": f"{self.config.retry_after_seconds:g}"}
            return web.Response(status=429, text="Too Many Requests", headers=headers)
        if fault in ("html_502", "html_503"):
            status = int(fault[-3:])
            return web.Response(status=status, text=_HTML_ERROR, content_type="text/html")
        if fault == "malformed":
            return web.Response(
                text='{"recipient_id": "1", "message_id', content_type="application/json"
            )
        if fault == "empty":
            return web.Response(status=200)
        if request.transport is not None:  # reset
            request.transport.abort()
        return None

    def _fault(self, psid: str) -> web.Response | str | None:
        """The fault this call gets: a Graph error, a name of ``FAULTS``, or ``None``."""
        config = self.config
        if config.outage_calls > 0:
            config.outage_calls -= 1
            return config.outage_fault
        if config.outage_until is not None and time.time() < config.outage_until:
            return config.outage_fault
        if psid in config.fail_psids:
            if config.fail_psids[psid] in FAULTS:
                return config.fail_psids[psid]
            code, _, subcode = config.fail_psids[psid].partition("/")
            return _graph_error(
                400,
                int(code),
                f"(#{code}) Injected failure",
                subcode=int(subcode) if subcode else None,
            )
        if _in_bucket(psid, "permanent", config.permanent_rate):
            if zlib.crc32(psid.encode()) % 2:
                return _graph_error(
                    400, 551, "(#551) This person isn't available right now.", subcode=1545041
                )
            return _graph_error(400, 100, "(#100) No matching user found", subcode=2018001)
        if _in_bucket(psid, "window", config.outside_window_rate):
            return _graph_error(
                400, 10, "(#10) This message is sent outside of allowed window.", subcode=2018278
            )
        if config.transient_rate and self._rng.random() < config.transient_rate:
            if self._rng.random() < 0.5:
                return _graph_error(500, 1, "An unknown error has occurred.", transient=True)
            return _graph_error(
                500,
                2,
                "An unexpected error has occurred. Please retry your request later.",
                transient=True,
            )
        return None

    def _deliver(
        self,
        window: _PageWindow,
        now: float,
        page_id: str,
        psid: str,
        message: dict[str, Any],
        message_id: str,
        token: str,
    ) -> None:
        window.delivered += 1
        _slide(window.deliveries, now)
        window.deliveries.append(now)
        window.max_per_second = max(window.max_per_second, len(window.deliveries))
        key = (page_id, psid)
        if key in self.delivered_once:
            self.duplicates += 1
        self.delivered_once.add(key)
        receipts = self.config.receipt_settings()
        if receipts is not None:
            self.receipts.delivered(receipts, page_id, psid, time.time())
        revoke_after = self.config.revoke_after
        if (
            revoke_after is not None
            and sum(p.delivered for p in self.pages.values()) >= revoke_after
        ):
            self.revoked.add(token)
            self.config.revoke_after = None
        if self._ledger is not None:
            record = {
                "t": time.time(),
                "page_id": page_id,
                "psid": psid,
                "message_id": message_id,
                "text": ledger_text(message),
            }
            if "text" not in message:
                record["message"] = message
            self._ledger.write(json.dumps(record) + "\n")


_HTML_ERROR = (
    "<html><head><title>Error</title></head><body>Sorry, something went wrong.</body></html>"
)


def _error_key(response: web.Response) -> str:
    """``code[/subcode]`` of a Graph error answer, ``http_<status>`` of any other."""
    try:
        error = json.loads(response.body)["error"]  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError):
        return f"http_{response.status}"
    return str(error["code"]) + (f"/{error['error_subcode']}" if "error_subcode" in error else "")


def _invalid_payload(body: dict[str, Any], uploads: Container[str]) -> str | None:
    recipient = body.get("recipient")
    if not isinstance(recipient, dict) or not recipient.get("id"):
        return "(#100) The parameter recipient is required"
    kind = body.get("messaging_type")
    if kind not in set(MessagingType):
        return "(#100) Param messaging_type must be one of {RESPONSE, UPDATE, MESSAGE_TAG}"
    tag = body.get("tag")
    if kind == MessagingType.MESSAGE_TAG and tag not in set(MessageTag):
        return "(#100) Param tag must be a valid message tag when messaging_type is MESSAGE_TAG"
    return invalid_message(body.get("message"), uploads)


def serve(config: SandboxConfig, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the sandbox in the foreground until interrupted."""
    web.run_app(Sandbox(config).app(), host=host, port=port, access_log=None, print=None)


@contextmanager
def running_sandbox(
    config: SandboxConfig, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[tuple[str, Sandbox]]:
    """Run the sandbox on ``port`` (0: a free one) in a background thread with its own event loop
    (usable from sync and async code alike); yields its base URL and its state."""
    sandbox = Sandbox(config)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(sandbox.app(), access_log=None)
    ready = threading.Event()
    failure: list[BaseException] = []

    def serve_forever() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            return
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve_forever, name="pagecast-sandbox", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    try:
        yield f"http://{host}:{runner.addresses[0][1]}", sandbox
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
