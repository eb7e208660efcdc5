"""The Messenger Send API client and the one table that classifies its errors.

The page token travels in the ``Authorization`` header, never in a URL. Requests go through httpx
with the ``httpx-aiohttp`` transport (plain httpx stalls at high concurrency); tests and the sandbox
can pass any ``transport``.
"""

import hashlib
import hmac
import json
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache
from types import TracebackType
from typing import Any, Self

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from pagecast.errors import (
    AmbiguousDelivery,
    GraphError,
    JobFatalGraphError,
    RecipientGraphError,
    ThrottledError,
    TransientGraphError,
)
from pagecast.settings import Settings

CONNECT_TIMEOUT = 5.0
POOL_TIMEOUT = 60.0
MAX_RETRY_AFTER_SECONDS = 300.0
OUTSIDE_WINDOW = "outside_24h_window"

_THROTTLE_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})
_TRANSIENT_CODES = frozenset({1, 2, 1200})
_FATAL_CODES = frozenset({190, 368})
_FATAL_PAIRS = frozenset({(10, None), (200, 2018027), (200, 2018028)})
_RECIPIENT_CODES = frozenset({551, 230})
_RECIPIENT_PAIRS = frozenset({(100, 2018001), (10, 2018108), (200, 1545041)})
_USAGE_HEADERS = ("x-page-usage", "x-app-usage", "x-business-use-case-usage")
# aiohttp errors raised before a request is written: retrying them cannot duplicate a message.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def classify(http_status: int, body: Any, *, retry_after: float | None = None) -> GraphError:
    """Turn a failed Send API response into the typed error that says what to do about it.

    An answer without Meta's error body came from something in front of the Send API: 429 and
    503 say the request was refused (retried), any other 5xx that it may have reached Meta and
    been lost there (``AmbiguousDelivery``: recorded ``unknown``, never resent), a 4xx that this
    recipient's request is unacceptable."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        message = f"HTTP {http_status} without a Graph error body"
        if http_status == 429:
            return ThrottledError(message, http_status=http_status, retry_after=retry_after)
        if http_status == 503:
            return TransientGraphError(message, http_status=http_status)
        if http_status >= 500:
            return AmbiguousDelivery(message, http_status=http_status)
        return RecipientGraphError(message, http_status=http_status)
    code, subcode = error.get("code"), error.get("error_subcode")
    details = {"code": code, "subcode": subcode, "http_status": http_status}
    message = str(error.get("message") or f"Graph error {code}")
    if http_status == 429 or code in _THROTTLE_CODES:
        return ThrottledError(message, retry_after=retry_after, **details)
    if code == 10 and subcode == 2018278:
        return RecipientGraphError(message, skip_reason=OUTSIDE_WINDOW, **details)
    if code in _RECIPIENT_CODES or (code, subcode) in _RECIPIENT_PAIRS:
        return RecipientGraphError(message, **details)
    if code in _FATAL_CODES or (code, subcode) in _FATAL_PAIRS or code in (100, 200):
        return JobFatalGraphError(message, **details)
    if error.get("is_transient") or code in _TRANSIENT_CODES or http_status >= 500:
        return TransientGraphError(message, **details)
    return RecipientGraphError(message, **details)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), at most
    ``MAX_RETRY_AFTER_SECONDS``; ``None`` without a readable one."""
    raw = headers.get("retry-after", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _usage_percent(headers: httpx.Headers) -> float | None:
    """The highest usage percentage Meta reports in its usage headers, if any."""
    highest: float | None = None
    for name in _USAGE_HEADERS:
        raw = headers.get(name)
        if not raw:
            continue
        try:
            parsed = json.loads(raw)
        except ValueError:
            continue
        stack = [parsed]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for key, value in item.items():
                    if key in ("call_count", "total_cputime", "total_time") and isinstance(
                        value, int | float
                    ):
                        highest = max(highest or 0.0, float(value))
                    else:
                        stack.append(value)
            elif isinstance(item, list):
                stack.extend(item)
    return highest


@dataclass(frozen=True)
class SendResult:
    """A delivered message: Meta's id, and the highest usage percentage the headers reported."""

    message_id: str
    usage_percent: float | None = None


@cache
def _tls_context() -> ssl.SSLContext:
    """The process's TLS context: loading the CA bundle took ~8 % of a run's CPU when every
    chunk's client built its own."""
    return httpx.create_ssl_context()


class GraphClient:
    """A pooled Send API client: one per run, with as many connections as requests in flight."""

    def __init__(
        self,
        *,
        base_url: str,
        version: str,
        token_for: Callable[[str], str],
        concurrency: int,
        app_secret: str | None = None,
        send_timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._token_for = token_for
        self._app_secret = app_secret
        self._http = httpx.AsyncClient(
            base_url=f"{base_url.rstrip('/')}/{version}",
            transport=transport or AiohttpTransport(limits=limits, verify=_tls_context()),
            limits=limits,
            timeout=httpx.Timeout(send_timeout, connect=CONNECT_TIMEOUT, pool=POOL_TIMEOUT),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.aclose()

    async def send_text(
        self, *, page_id: str, psid: str, text: str, messaging_type: str, tag: str | None = None
    ) -> SendResult:
        """Send one text message; raises a ``GraphError`` subclass on failure."""
        return await self.send_message(
            page_id=page_id,
            psid=psid,
            message={"text": text},
            messaging_type=messaging_type,
            tag=tag,
        )

    async def send_message(
        self,
        *,
        page_id: str,
        psid: str,
        message: dict[str, Any],
        messaging_type: str,
        tag: str | None = None,
    ) -> SendResult:
        """Send one message (the Send API's ``message`` object: text, an attachment or a
        template, with quick replies); raises a ``GraphError`` subclass on failure."""
        body: dict[str, Any] = {
            "recipient": {"id": psid},
            "messaging_type": messaging_type,
            "message": message,
        }
        if tag:
            body["tag"] = tag
        response, payload = await self._post(page_id, "messages", body)
        if response.status_code == 200 and isinstance(payload, dict) and payload.get("message_id"):
            return SendResult(str(payload["message_id"]), _usage_percent(response.headers))
        if response.status_code == 200:  # accepted, but nothing proves a delivery
            raise AmbiguousDelivery("HTTP 200 without a message_id", http_status=200)
        raise classify(response.status_code, payload, retry_after=_retry_after(response.headers))

    async def upload_attachment(self, *, page_id: str, kind: str, url: str) -> str:
        """Upload the attachment at ``url`` once for the page (Attachment Upload API) and return
        its reusable ``attachment_id``; raises a ``GraphError`` subclass on failure."""
        attachment = {"type": kind, "payload": {"url": url, "is_reusable": True}}
        response, payload = await self._post(
            page_id, "message_attachments", {"message": {"attachment": attachment}}
        )
        if response.status_code == 200 and isinstance(payload, dict):
            if payload.get("attachment_id"):
                return str(payload["attachment_id"])
            raise AmbiguousDelivery("HTTP 200 without an attachment_id", http_status=200)
        raise classify(response.status_code, payload, retry_after=_retry_after(response.headers))

    async def _post(
        self, page_id: str, edge: str, body: dict[str, Any]
    ) -> tuple[httpx.Response, Any]:
        """POST ``body`` to the page's ``edge`` with its token; the answer and its JSON (``None``
        when it is not JSON). A call that fails before it is written is transient; one that
        fails after may have been carried out: ``AmbiguousDelivery``."""
        token = self._token_for(page_id)
        if not (token.isascii() and token.isprintable()):  # no header can carry it: no call
            raise JobFatalGraphError(f"the access token of page {page_id} is not printable ASCII")
        if self._app_secret:
            body["appsecret_proof"] = hmac.new(
                self._app_secret.encode(), token.encode(), hashlib.sha256
            ).hexdigest()
        # Not chained to the transport's error: aiohttp's keep the request, token header included.
        try:
            response = await self._http.post(
                f"/{page_id}/{edge}", json=body, headers={"Authorization": f"Bearer {token}"}
            )
        except httpx.TransportError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, _NOT_SENT) or isinstance(
                exc, httpx.ConnectError | httpx.PoolTimeout
            ):
                raise TransientGraphError(f"not sent: {type(cause).__name__}") from None
            raise AmbiguousDelivery(f"no response: {type(cause).__name__}") from None
        except Exception as exc:  # the transport failed in a way it should not: maybe sent
            raise AmbiguousDelivery(f"no response: {type(exc).__name__}: {exc}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        return response, payload


def client_factory(
    settings: Settings, token_for: Callable[[str], str]
) -> Callable[[int], GraphClient]:
    """Build Graph clients for the configured API with ``concurrency`` connections each."""
    app_secret = settings.app_secret.get_secret_value() if settings.app_secret else None

    def build(concurrency: int) -> GraphClient:
        return GraphClient(
            base_url=settings.graph_api_url,
            version=settings.graph_api_version,
            token_for=token_for,
            concurrency=concurrency,
            app_secret=app_secret,
            send_timeout=settings.send_timeout_seconds,
        )

    return build
