"""Strict HTTP/1.1 on both sides of the gateway, parsed by h11, never by hand.

The student's side: every request on a keep-alive connection is read whole (chunked too) up to a cap that
depends on the endpoint, judged on its own, and answered before the next one is read. Framing that could be
read two ways (Content-Length with Transfer-Encoding, conflicting lengths, anything but chunked) is refused
and the connection closed. Nothing the student sent is forwarded as bytes: the gateway builds a new request.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

READ_SIZE = 65536
MAX_HEADER_BYTES = 32 * 1024
# A connection that sends no complete request head for this long is closed (an idle keep-alive too).
HEAD_TIMEOUT = 300.0


class HttpError(Exception):
    """An answer in docker's error shape: {"message": ...} with the status docker would use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The student's side closed or broke the connection."""


class BadJson(HttpError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, str] = {}
    result: dict[str, Any] = {}
    for key, value in pairs:
        folded = key.casefold()
        if folded in seen:
            raise BadJson(f"duplicate key in JSON body: {key!r} (already given as {seen[folded]!r})")
        seen[folded] = key
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise BadJson(f"invalid JSON value {name}")


# No body of the Engine API nests deeper than a dozen levels; the policy walks what it is given.
JSON_DEPTH_MAX = 64


def _depth_within(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return True


class TooDeep(ValueError):
    pass


def bounded_json(text: str, **options: Any) -> Any:
    """json.loads, refusing (TooDeep) what nests deeper than JSON_DEPTH_MAX."""
    try:
        value = json.loads(text, **options)
    except RecursionError:
        pass
    else:
        if _depth_within(value, JSON_DEPTH_MAX):
            return value
    raise TooDeep(f"nested more than {JSON_DEPTH_MAX} levels deep")


def strict_json(body: bytes) -> Any:
    """Decode a request body. Keys that repeat, also when they differ only by case (Go's decoder would match
    either to the same field), are refused, as are NaN and Infinity, and nesting deeper than JSON_DEPTH_MAX."""
    if not body.strip():
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson("request body is not valid UTF-8") from exc
    try:
        return bounded_json(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except BadJson:
        raise
    except ValueError as exc:
        raise BadJson(f"invalid JSON body: {exc}") from exc


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    upgrade: bool
    body: bytes = b""
    # Called once the body is no longer needed in memory (a build's context, once sent to the engine).
    body_sent: Callable[[], None] = lambda: None

    def arg(self, name: str, default: str = "") -> str:
        for key, value in self.query:
            if key == name:
                return value
        return default

    def args(self, name: str) -> list[str]:
        return [value for key, value in self.query if key == name]

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean query argument, read as the engine reads it."""
        value = self.arg(name, "").strip().lower()
        if value == "":
            return default
        return value not in ("0", "false", "no", "none")

    def json(self) -> Any:
        return strict_json(self.body)


SINGLE_HEADERS = {"content-length", "transfer-encoding", "content-type", "host", "upgrade", "connection"}


class ServerSide:
    """The student's connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        # An answer to HEAD has the head that GET would have, and no body.
        self.head_only = False
        # The status of the answer last begun.
        self.status = 0

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, f"malformed HTTP request: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self.reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    raise ClientGone() from exc
                self.conn.receive_data(data)
                continue
            return event

    async def next_request(self) -> Request | None:
        """The next request's head, or None when the student closed the connection between requests."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        try:
            event = await asyncio.wait_for(self._next_event(), HEAD_TIMEOUT)
        except TimeoutError as exc:
            raise ClientGone() from exc
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise HttpError(400, "malformed HTTP request")
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("ascii").lower()
            value = raw_value.decode("latin-1")
            if name in headers and name in SINGLE_HEADERS:
                raise HttpError(400, f"malformed HTTP request: repeated {name} header")
            headers[name] = value if name not in headers else f"{headers[name]}, {value}"
        if "content-length" in headers and "transfer-encoding" in headers:
            raise HttpError(400, "malformed HTTP request: both Content-Length and Transfer-Encoding")
        target = event.target.decode("ascii")
        split = urlsplit(target)
        if split.scheme or split.netloc or not split.path.startswith("/"):
            raise HttpError(400, "malformed HTTP request target")
        try:
            query = parse_qsl(split.query, keep_blank_values=True, strict_parsing=False, errors="strict")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, "malformed query string") from exc
        upgrade = "upgrade" in headers.get("connection", "").lower() and "upgrade" in headers
        method = event.method.decode("ascii").upper()
        self.head_only = method == "HEAD"
        return Request(
            method=method,
            target=target,
            path=split.path,
            query=query,
            headers=headers,
            upgrade=upgrade,
        )

    async def read_body(self, limit: int, *, keep: bool = True) -> bytes:
        """The request's body, up to `limit` bytes; with keep=False it is read and dropped as it comes."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(413, f"request body too large for the sandbox (limit {limit} bytes)")
                if keep:
                    parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone()
            else:
                raise HttpError(400, "malformed HTTP request body")

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise ClientGone() from exc

    async def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        head = [
            ("Api-Version", "1.41"),
            ("Content-Type", content_type),
            ("Docker-Experimental", "false"),
            ("Ostype", "linux"),
            ("Server", "Docker/20.10 (linux) layercake-gateway"),
            ("Content-Length", str(len(body))),
            *headers,
        ]
        self.status = status
        await self._send(h11.Response(status_code=status, headers=head))
        if body and not self.head_only:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def respond_json(self, status: int, payload: Any, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.respond(status, json.dumps(payload).encode() + b"\n", headers=headers)

    async def respond_error(self, error: HttpError) -> None:
        await self.respond_json(error.status, {"message": error.message})

    async def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None:
        head = [
            (name, value) for name, value in headers if name.lower() not in ("content-length", "transfer-encoding")
        ]
        head.append(("Transfer-Encoding", "chunked"))
        self.status = status
        await self._send(h11.Response(status_code=status, headers=head))

    async def stream_data(self, data: bytes) -> None:
        if data and not self.head_only:
            await self._send(h11.Data(data=data))

    async def end_stream(self) -> None:
        await self._send(h11.EndOfMessage())

    async def switch_protocols(self, headers: list[tuple[str, str]]) -> bytes:
        """Answer 101 and hand back whatever the student already sent past the request."""
        await self._send(h11.InformationalResponse(status_code=101, headers=headers))
        data, _closed = self.conn.trailing_data
        return bytes(data)

    @property
    def can_respond(self) -> bool:
        return self.conn.our_state is h11.SEND_RESPONSE

    @property
    def switched(self) -> bool:
        return self.conn.our_state is h11.SWITCHED_PROTOCOL

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def close(self) -> None:
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None

    @property
    def message(self) -> str:
        try:
            data = self.json()
        except ValueError:
            return self.body.decode("utf-8", "replace").strip()
        if isinstance(data, dict) and "message" in data:
            return str(data["message"])
        return self.body.decode("utf-8", "replace").strip()


class EngineStream:
    """One request to the engine on its own unix connection; no connection is ever reused."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)
        self.response: Response | None = None

    async def send(self, method: str, target: str, body: bytes | None, headers: list[tuple[str, str]]) -> None:
        head = [("Host", "docker"), ("User-Agent", "layercake-gateway"), *headers]
        if body is not None:
            head.append(("Content-Length", str(len(body))))
        self.writer.write(self.conn.send(h11.Request(method=method, target=target, headers=head)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_SIZE)
                self.conn.receive_data(data)
                continue
            return event

    async def head(self) -> Response:
        event = await self._next_event()
        while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
            event = await self._next_event()
        if not isinstance(event, h11.Response | h11.InformationalResponse):
            raise ConnectionError("the engine closed the connection")
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        self.response = Response(status=event.status_code, headers={k.lower(): v for k, v in raw}, raw_headers=raw)
        return self.response

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the engine closed the connection mid-response")

    async def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise HttpError(502, "the engine's answer is too large for the sandbox")
            parts.append(chunk)
        return b"".join(parts)

    def trailing(self) -> bytes:
        data, _closed = self.conn.trailing_data
        return bytes(data)

    def close(self) -> None:
        self.writer.close()
