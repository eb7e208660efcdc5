"""The Messenger Send API client and the one table that classifies its errors.

The page token travels in the ``Authorization`` header, never in a URL. Requests go through httpx
with the ``httpx-aiohttp`` transport (plain httpx stalls at high concurrency); tests and the sandbox
can pass any ``transport``.
"""

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
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
READ_TIMEOUT = 30.0
POOL_TIMEOUT = 60.0
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


def classify(http_status: int, body: Any) -> GraphError:
    """Turn a failed Send API response into the typed error that says what to do about it."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        kind = ThrottledError if http_status == 429 else TransientGraphError
        if http_status < 500 and http_status != 429:
            kind = RecipientGraphError
        return kind(f"HTTP {http_status} without a Graph error body", http_status=http_status)
    code, subcode = error.get("code"), error.get("error_subcode")
    details = {"code": code, "subcode": subcode, "http_status": http_status}
    message = str(error.get("message") or f"Graph error {code}")
    if http_status == 429 or code in _THROTTLE_CODES:
        return ThrottledError(message, **details)
    if code == 10 and subcode == 2018278:
        return RecipientGraphError(message, skip_reason=OUTSIDE_WINDOW, **details)
    if code in _RECIPIENT_CODES or (code, subcode) in _RECIPIENT_PAIRS:
        return RecipientGraphError(message, **details)
    if code in _FATAL_CODES or (code, subcode) in _FATAL_PAIRS or code in (100, 200):
        return JobFatalGraphError(message, **details)
    if error.get("is_transient") or code in _TRANSIENT_CODES or http_status >= 500:
        return TransientGraphError(message, **details)
    return RecipientGraphError(message, **details)


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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._token_for = token_for
        self._app_secret = app_secret
        self._http = httpx.AsyncClient(
            base_url=f"{base_url.rstrip('/')}/{version}",
            transport=transport or AiohttpTransport(limits=limits),
            limits=limits,
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT, pool=POOL_TIMEOUT),
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
        token = self._token_for(page_id)
        body: dict[str, Any] = {
            "recipient": {"id": psid},
            "messaging_type": messaging_type,
            "message": {"text": text},
        }
        if tag:
            body["tag"] = tag
        if self._app_secret:
            body["appsecret_proof"] = hmac.new(
                self._app_secret.encode(), token.encode(), hashlib.sha256
            ).hexdigest()
        try:
            response = await self._http.post(
                f"/{page_id}/messages", json=body, headers={"Authorization": f"Bearer {token}"}
            )
        except httpx.TransportError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, _NOT_SENT) or isinstance(
                exc, httpx.ConnectError | httpx.PoolTimeout
            ):
                raise TransientGraphError(f"not sent: {type(cause).__name__}") from exc
            raise AmbiguousDelivery(f"no response: {type(cause).__name__}") from exc
        except Exception as exc:  # the transport failed in a way it should not: maybe sent
            raise AmbiguousDelivery(f"no response: {type(exc).__name__}: {exc}") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code == 200 and isinstance(payload, dict) and payload.get("message_id"):
            return SendResult(str(payload["message_id"]), _usage_percent(response.headers))
        raise classify(response.status_code, payload)


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
        )

    return build
