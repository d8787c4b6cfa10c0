"""The shared engine, reached over its unix socket with one fresh connection per request."""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

from .config import API_VERSION
from .http import EngineStream, HttpError, Response

RESPONSE_MAX = 64 * 1024 * 1024
RECONNECT_SECONDS = 1.0

log = logging.getLogger(__name__)


class EngineError(HttpError):
    """The engine refused; status and message are the engine's, already unmasked by the caller."""


def engine_path(path: str, query: list[tuple[str, str]] | dict[str, str] | None = None) -> str:
    target = f"/v{API_VERSION}{path}"
    if query:
        target += "?" + urlencode(query)
    return target


def q(value: str) -> str:
    return quote(value, safe="")


class Engine:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def open(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | dict[str, str] | None = None,
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> EngineStream:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=1024 * 1024)
        except OSError as exc:
            raise HttpError(
                503, "Cannot connect to the Docker daemon behind the sandbox. Try again shortly."
            ) from exc
        stream = EngineStream(reader, writer)
        try:
            await stream.send(method, engine_path(path, query), body, headers or [])
        except (ConnectionError, OSError) as exc:
            stream.close()
            raise HttpError(503, "the Docker daemon behind the sandbox closed the connection") from exc
        return stream

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | dict[str, str] | None = None,
        payload: Any = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Response:
        headers: list[tuple[str, str]] = []
        if payload is not None:
            body = json.dumps(payload).encode()
        if body is not None:
            headers.append(("Content-Type", content_type))
        stream = await self.open(method, path, query=query, body=body, headers=headers)
        try:
            response = await stream.head()
            response.body = await stream.read_all(RESPONSE_MAX)
            return response
        except (ConnectionError, OSError) as exc:
            raise HttpError(503, "the Docker daemon behind the sandbox closed the connection") from exc
        finally:
            stream.close()

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.call(method, path, **kwargs)
        if response.status >= 400:
            raise EngineError(response.status, response.message)
        return response.json()


async def follow_events(
    engine: Engine,
    filters: dict[str, list[str]],
    *,
    connected: Callable[[], None],
    event: Callable[[bytes], Awaitable[None]],
    lost: Callable[[], None] = lambda: None,
) -> None:
    """Follow the engine's events that match `filters` for as long as the caller runs, reconnecting when the
    stream fails: `connected` is called each time it is open (what happened while it was down is to be caught
    up with then), `event` with each event's line, `lost` each time it ends.

    The engine answers before it subscribes, and an event in between would be missed: each stream asks for the
    events since it was asked for, and a stream that takes the place of a lost one for those since the last
    it delivered, so that none is missed or delivered twice. The engine keeps only its latest few hundred
    events of every kind, and none across its own restart: past those, `connected` is the caller's catch-up."""
    resume: int | None = None
    while True:
        stream: EngineStream | None = None
        if resume is None:
            resume = time.time_ns()
        try:
            stream = await engine.open(
                "GET", "/events", query={"filters": json.dumps(filters), "since": event_time(resume)}
            )
            head = await stream.head()
            if head.status != 200:
                raise ConnectionError(f"engine events answered {head.status}")
            connected()
            pending = b""
            async for chunk in stream.chunks():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        resume = max(resume, event_nanoseconds(line) + 1)
                        await event(line)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("engine event stream %s failed; reconnecting", filters, exc_info=True)
        finally:
            lost()
            if stream is not None:
                stream.close()
        await asyncio.sleep(RECONNECT_SECONDS)


def event_time(nanoseconds: int) -> str:
    """A moment as the engine's `since` reads it: seconds, and nanoseconds after the point."""
    return f"{nanoseconds // 1_000_000_000}.{nanoseconds % 1_000_000_000:09d}"


def event_nanoseconds(line: bytes) -> int:
    """When the engine says an event happened, or 0 for a line that does not say."""
    try:
        moment = json.loads(line).get("timeNano")
    except (ValueError, AttributeError):
        return 0
    return moment if isinstance(moment, int) else 0
