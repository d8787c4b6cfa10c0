"""The student's published ports on the lesson page: a list of links, and a proxy that opens them.

The gateway keeps each session's published ports in Redis (`sandbox/gateway/ports.py`); these views read only
that, never the engine. `port_proxy` connects from this machine to the container's address on the session's
network (the host firewall drops new connections *from* sandbox bridges, not replies to this machine's own)
and relays one HTTP exchange, GET or HEAD, streamed, capped in size and in time, a few at once per sandbox.

What a student's container serves is untrusted, and it is served from the site's own origin, so: only the
sandbox's owner can open it (anyone else gets 404, as for a sandbox that does not exist); it is sandboxed as
an opaque origin (CSP `sandbox` without `allow-same-origin`), so its scripts cannot read the site's cookies,
pages or CSRF token, nor register a service worker; cookies and credentials are neither forwarded to the
container nor accepted from it; nothing is cached; and the proxy connects only to an address on a container
network (RFC 1918) that is not one of this machine's own, whatever the record says.

What follows for the student's app: it is served under /sandbox/<pk>/port/<port>/, so links relative to the
page work and links starting with "/" leave it (redirects are rewritten); pages, links and GET forms work,
while POSTs and the page's own fetch() calls do not (an opaque origin's requests carry no session cookie).
"""

import asyncio
import functools
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, urlsplit

import httpx
import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from .gateway.config import gateway_config
from .models import Sandbox, SandboxState
from .owners import owner_key_for_request
from .selectors import sandbox_owned

log = logging.getLogger(__name__)

PROXY_BODY_MAX = 32 * 1024 * 1024
PROXY_TIMEOUT = httpx.Timeout(15.0, connect=3.0)
# A whole exchange, headers and body, ends by then: a server that drips a byte now and then would otherwise
# hold a connection of this process for as long as it likes.
PROXY_DEADLINE = 120.0
# Exchanges one sandbox may have in flight in this process (a browser opens six per host): one student cannot
# take every connection this process can hold.
PROXY_PER_SANDBOX = 8
FORWARD_HEADERS = ("accept", "accept-language", "accept-encoding", "user-agent", "range")
PASS_HEADERS = (
    "content-type",
    "content-encoding",
    "content-language",
    "content-range",
    "content-disposition",
    "accept-ranges",
    "last-modified",
    "etag",
)
# An opaque origin: the page's scripts run, but as no one the site knows.
SANDBOX_CSP = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads; frame-ancestors 'self'"
GUARD_HEADERS = {
    "Content-Security-Policy": SANDBOX_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# Where the engine puts its networks (RFC 1918, its default address pools); never loopback, "this host"
# (0.0.0.0/8), link-local or a public address, whatever a record says.
CONTAINER_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


@dataclass(frozen=True)
class PublishedPort:
    """A port the student published: `localhost:<port>` in their shell is `<container>:<container_port>`."""

    port: int
    container_port: int
    container: str
    address: str


def _valid_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _parse(raw: bytes | str | None) -> list[PublishedPort]:
    """The gateway's record, kept only where it names valid ports and an address on a container network."""
    if not raw:
        return []
    try:
        entries = json.loads(raw)["ports"]
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring a malformed published ports record")
        return []
    ports = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        try:
            address = ipaddress.ip_address(str(entry.get("address", "")))
        except ValueError:
            continue
        if not any(address in network for network in CONTAINER_NETWORKS):
            continue
        if not (_valid_port(entry.get("port")) and _valid_port(entry.get("container_port"))):
            continue
        ports.append(
            PublishedPort(
                port=entry["port"],
                container_port=entry["container_port"],
                container=str(entry.get("container", "")),
                address=str(address),
            )
        )
    return sorted(ports, key=lambda p: p.port)


@functools.lru_cache(maxsize=4)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def sandbox_published_ports(*, sandbox: Sandbox) -> list[PublishedPort]:
    """The sandbox's published ports as the gateway last wrote them; none unless the sandbox is ready."""
    if sandbox.state != SandboxState.READY:
        return []
    config = gateway_config()
    try:
        raw = _redis(config.redis_url).get(config.ports_key(sandbox.pk))
    except redis.RedisError:
        log.warning("could not read the published ports of sandbox %s", sandbox.pk, exc_info=True)
        return []
    return _parse(cast(bytes | None, raw))


async def _published_port(*, sandbox_id: int, port: int) -> PublishedPort | None:
    config = gateway_config()
    client = aioredis.Redis.from_url(config.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw = await client.get(config.ports_key(sandbox_id))
    except redis.RedisError:
        log.warning("could not read the published ports of sandbox %s", sandbox_id, exc_info=True)
        return None
    finally:
        await client.aclose()
    found = next((p for p in _parse(raw) if p.port == port), None)
    if found is not None and _is_this_machine(found.address):
        log.warning("sandbox %s: a published port names this machine's address %s", sandbox_id, found.address)
        return None
    return found


def _is_this_machine(address: str) -> bool:
    """An address this machine could bind is its own (a bridge's, say): the proxy never connects there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def _owned_ready_sandbox(request: HttpRequest, pk: int) -> Sandbox | None:
    sandbox = sandbox_owned(owner_key=owner_key_for_request(request), sandbox_id=pk)
    return sandbox if sandbox is not None and sandbox.state == SandboxState.READY else None


@require_GET
def ports(request: HttpRequest, pk: int) -> HttpResponse:
    """The panel's list of published ports, an htmx fragment fetched again when the terminal says they changed,
    and polled while the sandbox is live."""
    sandbox = sandbox_owned(owner_key=owner_key_for_request(request), sandbox_id=pk)
    if sandbox is None:
        raise Http404("No such sandbox.")
    context = {"sandbox": sandbox, "ports": sandbox_published_ports(sandbox=sandbox)}
    response = render(request, "sandbox/ports.html", context)
    if not sandbox.is_active:
        response.status_code = 286  # htmx: stop polling
    return response


def _plain(status: int, message: str) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    for name, value in GUARD_HEADERS.items():
        response[name] = value
    return response


def _location(value: str, *, prefix: str, port: PublishedPort) -> str:
    """A redirect within the student's app stays within the proxy."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.hostname in ("localhost", "127.0.0.1", port.address):
        value = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        value += f"#{parts.fragment}" if parts.fragment else ""
    if value.startswith("/") and not value.startswith("//"):
        return prefix + value
    return value


# Per sandbox, the deadlines of its exchanges in flight. One whose end was never seen (a response dropped
# before its body started) stops counting at its deadline.
_in_flight: dict[int, list[float]] = {}


def _admit(sandbox_id: int, deadline: float) -> bool:
    now = asyncio.get_running_loop().time()
    live = [d for d in _in_flight.get(sandbox_id, ()) if d > now]
    admitted = len(live) < PROXY_PER_SANDBOX
    if admitted:
        live.append(deadline)
    _in_flight[sandbox_id] = live
    return admitted


def _release(sandbox_id: int, deadline: float) -> None:
    live = _in_flight.get(sandbox_id, [])
    if deadline in live:
        live.remove(deadline)
    if not live:
        _in_flight.pop(sandbox_id, None)


async def _relay(
    client: httpx.AsyncClient,
    upstream: httpx.Response,
    *,
    limit: int,
    deadline: float,
    release: Callable[[], None],
) -> AsyncIterator[bytes]:
    sent = 0
    chunks = upstream.aiter_raw()
    # The deadline holds while the browser reads, too: a browser that takes the bytes slowly keeps this
    # generator waiting between chunks, and the exchange with the port would otherwise stay open until it
    # has read the whole body, no longer counted against the sandbox's exchanges in flight.
    cutoff = asyncio.get_running_loop().call_at(deadline, lambda: _hang_up(upstream, client))
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                log.info("cut a proxied response at its deadline")
                return
            if sent + len(chunk) > limit:
                log.info("cut a proxied response at %s bytes", limit)
                yield chunk[: limit - sent]
                return
            sent += len(chunk)
            yield chunk
    except httpx.HTTPError as exc:
        log.info("a proxied response broke off: %s", exc)
    except httpx.StreamClosed:
        log.info("cut a proxied response at its deadline, its browser reading slowly")
    finally:
        cutoff.cancel()
        release()
        await upstream.aclose()
        await client.aclose()


def _hang_up(upstream: httpx.Response, client: httpx.AsyncClient) -> None:
    async def hang_up() -> None:
        await upstream.aclose()
        await client.aclose()

    task = asyncio.ensure_future(hang_up())
    _hanging_up.add(task)
    task.add_done_callback(_hanging_up.discard)


# Hang-ups in progress, held so that their tasks live until they end.
_hanging_up: set[asyncio.Task[None]] = set()


@require_http_methods(["GET", "HEAD"])
async def port_proxy(request: HttpRequest, pk: int, port: int, path: str = "") -> HttpResponseBase:
    """`localhost:<port>` of the owner's sandbox, opened in the browser."""
    sandbox = await sync_to_async(_owned_ready_sandbox)(request, pk)
    if sandbox is None:
        raise Http404("No such sandbox.")
    published = await _published_port(sandbox_id=sandbox.pk, port=port)
    if published is None:
        raise Http404("Nothing is published on that port.")
    if request.headers.get("Service-Worker"):
        return _plain(403, "A sandbox's page cannot install a service worker.")
    prefix = reverse("sandbox:port", kwargs={"pk": sandbox.pk, "port": port}).rstrip("/")
    target = quote("/" + path, safe="/-._~!$&'()*+,;=:@%")
    query = request.META.get("QUERY_STRING", "")
    if query:
        target += "?" + quote(query, safe="=&;%+/?:@!$'()*,~-._")
    headers = {name: request.headers[name] for name in FORWARD_HEADERS if name in request.headers}
    headers["Host"] = f"localhost:{port}"
    headers["X-Forwarded-Prefix"] = prefix
    url = httpx.URL(scheme="http", host=published.address, port=published.container_port, raw_path=target.encode())
    deadline = asyncio.get_running_loop().time() + PROXY_DEADLINE
    if not _admit(sandbox.pk, deadline):
        busy = _plain(503, "This sandbox's ports are answering as many requests as they may. Try again shortly.")
        busy["Retry-After"] = "5"
        return busy
    release = functools.partial(_release, sandbox.pk, deadline)
    client = httpx.AsyncClient(timeout=PROXY_TIMEOUT, trust_env=False, follow_redirects=False)

    async def give_up(status: int, message: str) -> HttpResponse:
        release()
        await client.aclose()
        return _plain(status, message)

    try:
        outgoing = client.build_request(request.method or "GET", url, headers=headers)
        async with asyncio.timeout_at(deadline):
            upstream = await client.send(outgoing, stream=True)
    except (httpx.TimeoutException, TimeoutError):
        return await give_up(
            504, f"Port {published.container_port} of {published.container} did not answer in time."
        )
    except httpx.HTTPError:
        return await give_up(
            502,
            f"Nothing answers on port {published.container_port} of {published.container}. Is the server in the "
            f"container running, and listening on 0.0.0.0:{published.container_port}?",
        )
    except BaseException:
        # The browser went away (the view is cancelled) or something unforeseen broke: the slot and the
        # client go now, not at the deadline.
        release()
        await client.aclose()
        raise
    length = upstream.headers.get("content-length", "")
    if length.isdigit() and int(length) > PROXY_BODY_MAX:
        await upstream.aclose()
        return await give_up(502, f"The page is larger than the {PROXY_BODY_MAX:,} bytes this proxy relays.")
    if request.method == "HEAD":
        await upstream.aclose()
        release()
        await client.aclose()
        response: HttpResponseBase = HttpResponse(status=upstream.status_code)
    else:
        body = _relay(client, upstream, limit=PROXY_BODY_MAX, deadline=deadline, release=release)
        response = StreamingHttpResponse(body, status=upstream.status_code)
    if length.isdigit():
        response["Content-Length"] = length
    if "content-type" not in upstream.headers:
        del response["Content-Type"]
    for name in PASS_HEADERS:
        if name in upstream.headers:
            response[name] = upstream.headers[name]
    if "location" in upstream.headers:
        response["Location"] = _location(upstream.headers["location"], prefix=prefix, port=published)
    for name, value in GUARD_HEADERS.items():
        response[name] = value
    return response
