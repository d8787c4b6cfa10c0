"""The gateway process: one asyncio unix server per registered sandbox session.

Sessions come from the Redis registry (`registry.py`): all of them when the process starts, each new one
when a notice arrives, and any drift every few seconds. A restarted gateway therefore recreates every
session's socket in the directory the workstation already has mounted, and the student's next docker
command works in the same shell. Published ports (`ports.py`) are synced when a session is served, on the
engine's container events, whenever the event stream (re)connects, and every minute; they outlive a
restart of the gateway and go only when their session closes.

A session is served until its record's expiry and not a second longer, whatever else is running: at expiry
its socket and port forwarders go (the reaper, or the workstation's own timer, removes the rest), and a
connection that reaches it in between is answered that the sandbox has expired.
"""

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import time
from pathlib import Path

import redis.asyncio as aioredis

from .config import GatewayConfig
from .disk import DiskWatch
from .engine import Engine, follow_events
from .events import EventPublisher
from .http import ClientGone, HttpError, ServerSide
from .imagelist import ImageList
from .labels import IMAGE_LABEL, NAMESPACE, PORTS_LABEL, ROLE, SESSION
from .ports import SYNC_SECONDS, PortForwards
from .registry import SessionRecord
from .session import MAX_CONNECTIONS, MAX_GATEWAY_BUILDS, StudentGateway

log = logging.getLogger(__name__)

RECONCILE_SECONDS = 5.0
CONTAINER_EVENTS = {
    "create": "container.created",
    "start": "container.started",
    "die": "container.stopped",
    "destroy": "container.removed",
    "pause": "container.paused",
    "unpause": "container.unpaused",
}
PORTS_EVENTS = {"container.started", "container.stopped", "container.removed"}


def open_files_limit() -> int:
    """Raise this process's limit on open files to what the system allows, and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the limit on open files from %s: %s", soft, exc)
    return soft


def expired(record: SessionRecord) -> bool:
    return record.expires_at <= time.time()


EXPIRED = HttpError(403, "this sandbox has expired; start a new one from the lesson page")
SESSION_FULL = HttpError(
    503, f"your sandbox's docker has {MAX_CONNECTIONS} connections open already; close some and try again"
)
GATEWAY_FULL = HttpError(503, "the sandbox's docker is busy right now; try again shortly")


# Refusals answered at once (each waits a second at most for the request to answer); past this many, a
# connection is closed unanswered, so that refusing cannot itself hold the gateway's open files.
REFUSALS_MAX = 64


def bound_socket(path: Path) -> socket.socket:
    """A listening socket at `path`, bound through a descriptor of its directory: a unix socket's name is
    what every client reads as its peer's address, and the host's own paths are no student's business."""
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"/proc/self/fd/{directory}/{path.name}")
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    finally:
        os.close(directory)
    sock.setblocking(False)
    return sock


class SessionServer:
    def __init__(self, gateway: StudentGateway, server: asyncio.AbstractServer, path: Path) -> None:
        self.gateway = gateway
        self.server = server
        self.path = path
        self.connections: set[asyncio.Task[None]] = set()
        self.expiry: asyncio.Task[None] | None = None


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.engine = Engine(config.engine_socket)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(config.redis_url)
        self.events = EventPublisher(redis=self.redis, channel=config.events_channel)
        self.ports = PortForwards(engine=self.engine, config=config, redis=self.redis, events=self.events)
        self.sessions: dict[int, SessionServer] = {}
        self.builds = asyncio.Semaphore(MAX_GATEWAY_BUILDS)
        self.disk = DiskWatch(self.engine, namespace=config.namespace, events=self.events)
        self.engine_images = ImageList(self.engine)
        # Each student connection may hold one to the engine as well; what is left serves the sockets,
        # Redis and the forwarders' bookkeeping. Past this, a new connection is closed at once, so that no
        # student can starve the others of the gateway's open files.
        # Set from the open-files limit when the gateway runs.
        self.max_connections = MAX_CONNECTIONS
        self.refusing = 0
        self.warned_full_at = 0.0
        self.ready = asyncio.Event()
        self._lock = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> None:
        files = open_files_limit()
        self.max_connections = max(files // 3, MAX_CONNECTIONS)
        log.info("serving at most %s connections (open files: %s)", self.max_connections, files)
        self.config.gateway_dir.mkdir(parents=True, exist_ok=True)
        tasks = [
            asyncio.create_task(self._control()),
            asyncio.create_task(self._reconcile_forever()),
            asyncio.create_task(self._watch_engine_events()),
            asyncio.create_task(self.engine_images.follow()),
            asyncio.create_task(self._sync_ports_forever()),
            asyncio.create_task(self.disk.watch_forever()),
            asyncio.create_task(self.disk.follow()),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.ports.shutdown()
            for session_id in list(self.sessions):
                await self.close_session(session_id, remove_dir=False)
            await self.redis.aclose()

    async def refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: HttpError) -> None:
        """Answer a connection's first request with the error, waiting a moment at most for it, and close."""
        if self.refusing >= REFUSALS_MAX:
            writer.close()
            return
        self.refusing += 1
        side = ServerSide(reader, writer)
        try:
            async with asyncio.timeout(1.0):
                if await side.next_request() is not None:
                    await side.respond_error(error)
        except (ClientGone, HttpError, TimeoutError):
            pass
        finally:
            self.refusing -= 1
            await side.close()

    async def reconcile(self) -> None:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.config.sessions_key)  # type: ignore[misc]
        records = {}
        for key, value in raw.items():
            try:
                record = SessionRecord.loads(value)
            except (ValueError, KeyError):
                log.warning("ignoring a malformed session record %r", key)
                continue
            records[record.session_id] = record
        live = {session_id: record for session_id, record in records.items() if not expired(record)}
        for session_id, record in live.items():
            if session_id not in self.sessions or not self.sessions[session_id].path.exists():
                await self.open_session(record)
        for session_id in list(self.sessions):
            if session_id not in live:
                await self.close_session(session_id)

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
                self.ready.set()
            except Exception:
                log.exception("could not read the session registry")
            await asyncio.sleep(RECONCILE_SECONDS)

    async def _control(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub()
                await pubsub.subscribe(self.config.control_channel)
                await self.reconcile()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        notice = json.loads(message["data"])
                        session_id = int(notice["session_id"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if notice.get("op") == "close":
                        await self.close_session(session_id)
                    else:
                        await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the control channel failed; resubscribing")
                await asyncio.sleep(1)

    async def open_session(self, record: SessionRecord) -> None:
        if expired(record):
            return
        async with self._lock:
            existing = self.sessions.get(record.session_id)
            if existing is not None:
                if existing.path.exists():
                    existing.gateway.record = record
                    self._arm_expiry(existing)
                    return
                await self._close(record.session_id, remove_dir=False)
            directory = self.config.session_dir(record.session_id)
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o755)
            path = self.config.session_socket(record.session_id)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            gateway = StudentGateway(
                record=record,
                config=self.config,
                engine=self.engine,
                events=self.events,
                ports=self.ports,
                builds=self.builds,
                disk=self.disk,
                engine_images=self.engine_images,
            )
            holder: SessionServer | None = None

            async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert holder is not None and task is not None
                if expired(holder.gateway.record):
                    await self.refuse(reader, writer, EXPIRED)
                    return
                if len(holder.connections) >= MAX_CONNECTIONS:
                    await self.refuse(reader, writer, SESSION_FULL)
                    return
                if sum(len(h.connections) for h in self.sessions.values()) >= self.max_connections:
                    if time.monotonic() - self.warned_full_at >= 1.0:
                        self.warned_full_at = time.monotonic()
                        log.warning("session %s: refusing connections: the gateway is full", record.session_id)
                    await self.refuse(reader, writer, GATEWAY_FULL)
                    return
                holder.connections.add(task)  # type: ignore[arg-type]
                try:
                    await holder.gateway.serve(reader, writer)
                finally:
                    holder.connections.discard(task)  # type: ignore[arg-type]

            staging = directory / ".docker.sock.new"
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            server = await asyncio.start_unix_server(on_connection, sock=bound_socket(staging), limit=1024 * 1024)
            # Never through a link, should one be where the socket was just made.
            os.chown(staging, self.config.socket_uid, self.config.socket_gid, follow_symlinks=False)
            os.chmod(staging, 0o660, follow_symlinks=False)
            os.replace(staging, path)
            holder = SessionServer(gateway, server, path)
            self._arm_expiry(holder)
            self.sessions[record.session_id] = holder
            self.disk.join(gateway)
            log.info("session %s: serving %s", record.session_id, path)
            self.ports.request_sync(record)

    def _arm_expiry(self, holder: SessionServer) -> None:
        if holder.expiry is not None:
            holder.expiry.cancel()
        holder.expiry = asyncio.create_task(self._close_at_expiry(holder, holder.gateway.record))

    async def _close_at_expiry(self, holder: SessionServer, record: SessionRecord) -> None:
        await asyncio.sleep(max(record.expires_at - time.time(), 0))
        if self.sessions.get(record.session_id) is holder:
            log.info("session %s: expired", record.session_id)
            await self.close_session(record.session_id)

    async def close_session(self, session_id: int, *, remove_dir: bool = True) -> None:
        async with self._lock:
            await self._close(session_id, remove_dir=remove_dir)

    async def _close(self, session_id: int, *, remove_dir: bool) -> None:
        holder = self.sessions.pop(session_id, None)
        self.disk.leave(session_id)
        if holder is not None:
            if holder.expiry is not None and holder.expiry is not asyncio.current_task():
                holder.expiry.cancel()
            holder.server.close()
            for task in list(holder.connections):
                task.cancel()
            await asyncio.gather(*holder.connections, return_exceptions=True)
        path = self.config.session_socket(session_id)
        if remove_dir:
            # The socket goes with its listener; the forwarders, which take the engine's time, after it.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            try:
                await self.ports.close(session_id)
            except Exception:
                log.warning("session %s: could not remove its port forwarders", session_id, exc_info=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        log.info("session %s: closed", session_id)

    async def _watch_engine_events(self) -> None:
        filters = {
            "type": ["container"],
            "event": list(CONTAINER_EVENTS),
            "label": [f"{NAMESPACE}={self.config.namespace}", f"{ROLE}=student"],
        }
        await follow_events(
            self.engine, filters, connected=self._sync_all_ports, event=self._publish_container_event
        )

    def _sync_all_ports(self) -> None:
        for holder in list(self.sessions.values()):
            self.ports.request_sync(holder.gateway.record)

    async def _sync_ports_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            self._sync_all_ports()

    async def _publish_container_event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            attributes = event["Actor"]["Attributes"]
            session_id = int(attributes[SESSION])
            kind = CONTAINER_EVENTS[event["Action"].split(":")[0]]
        except (ValueError, KeyError, TypeError):
            return
        holder = self.sessions.get(session_id)
        if holder is not None and attributes.get(PORTS_LABEL) and kind in PORTS_EVENTS:
            self.ports.request_sync(holder.gateway.record)
        prefix = f"{self.config.namespace}-s{session_id}-"
        fields = {
            "id": event["Actor"].get("ID", ""),
            "name": str(attributes.get("name", "")).removeprefix(prefix),
            "image": attributes.get(IMAGE_LABEL) or attributes.get("image", ""),
        }
        if kind == "container.stopped":
            fields["exit_code"] = int(attributes.get("exitCode", 0) or 0)
        await self.events.publish(session_id, kind, **fields)
