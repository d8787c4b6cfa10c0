"""Published ports, served inside the session and never on the host.

The policy records `docker run -p 8080:80` in the container's `layercake.ports` label, and ps and inspect
show it as docker does. While such a container runs, the gateway keeps a *forwarder* for it: a small
container that joins the workstation's network namespace (`--network container:<workstation>`), listens on
127.0.0.1:8080 there, which is where the student's `curl localhost:8080` looks, and relays each connection
with socat to the container's address on the session network. The forwarder runs as nobody, with no
capabilities, a read-only root and small limits, and reaches only what the workstation already reaches.

Everything lives on the engine. A forwarder carries the session's labels plus the container it serves, that
container's address, its ports, and the workstation it joined. `PortForwards.sync` compares the forwarders
with what should run and removes or creates the difference. It runs when a container with ports is started
through the gateway (before `docker start` answers, so the port is ready when `docker run -d` returns), on
the engine's start, die and destroy events, when a session is served (so a restarted gateway takes up where
it was), and every minute. A forwarder whose socat exits (a listener in the student's shell holds the port)
stays exited until its container starts again; nothing retries in a loop. A port that a server in the
student's shell already holds fails the start as docker fails it ("address already in use"): before the
start, by reading what listens in the workstation; and should the server have come up meanwhile, after it,
since the start waits until socat says it listens on every port.

A host port belongs to one running container. Starting a second that asks for it fails as docker fails
("port is already allocated"); if the engine itself restarts one (a restart policy), the container that held
the port keeps it.

The session's ports are written to Redis as JSON under `<namespace>:gateway:ports:<session_id>`
({"ports": [{"port", "container_port", "proto", "container", "address"}, ...]}) for the site, which lists
them on the lesson page and proxies HTTP to them (`sandbox/ports.py`). The key goes when the session closes.
"""

import asyncio
import json
import logging
import re
import shlex
import struct
import time
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

from . import policy
from .config import GatewayConfig
from .engine import Engine, EngineError, q
from .events import EventPublisher
from .http import HttpError
from .labels import EXPIRES, MANAGED, NAMESPACE, OWNER, PORTS_LABEL, ROLE, SESSION
from .names import Namer
from .registry import SessionRecord
from .session import publishes

log = logging.getLogger(__name__)

FORWARDER_ROLE = "port-forwarder"
TARGET = "layercake.forward.target"
ADDRESS = "layercake.forward.address"
WORKSTATION = "layercake.forward.workstation"
FORWARDER_USER = "65534:65534"
FORWARDER_MEMORY = 32 * 1024 * 1024
FORWARDER_PIDS = 96
FORWARDER_NANO_CPUS = 250_000_000
# Connections one listener relays at once; each is a socat child process in the forwarder.
FORWARDER_CHILDREN = 32
SYNC_SECONDS = 60.0
# How long a start waits for its forwarder to say that it listens (or that it cannot).
LISTEN_WAIT_SECONDS = 5.0
# What listens in a workstation: a few lines per socket, so this bounds a table no workstation has.
PROC_TABLE_MAX = 256 * 1024
HEX_PORT_RE = re.compile(r"[0-9A-Fa-f]{1,4}")
LISTENING_RE = re.compile(rb"N listening on AF=\d+ [0-9.]+:(\d+)")
BIND_FAILED_RE = re.compile(rb"E bind\(\d+, \{AF=\d+ [0-9.]+:(\d+)\}")
LOG_CONFIG = {"Type": "local", "Config": {"max-size": "256k", "max-file": "1", "compress": "false"}}


@dataclass(frozen=True)
class Published:
    """A running container's published ports as the session serves them."""

    container_id: str
    name: str
    address: str
    started_at: str
    ports: tuple[policy.PortBinding, ...]

    def as_json(self) -> list[dict[str, Any]]:
        return [
            {
                "port": port.host_port,
                "container_port": port.container_port,
                "proto": port.proto,
                "container": self.name,
                "address": self.address,
            }
            for port in self.ports
        ]


@dataclass(frozen=True)
class WorkstationInfo:
    id: str
    image: str
    started_at: str

    @property
    def key(self) -> str:
        return f"{self.id}@{self.started_at}"


def _labels(detail: dict[str, Any]) -> dict[str, str]:
    return dict((detail.get("Config") or {}).get("Labels") or {})


def _host_address(port: policy.PortBinding) -> str:
    address = port.addresses[0]
    return f"[{address}]:{port.host_port}" if ":" in address else f"{address}:{port.host_port}"


def port_allocated(*, name: str, container_id: str, port: policy.PortBinding) -> HttpError:
    return HttpError(
        500,
        f"driver failed programming external connectivity on endpoint {name} ({container_id}): "
        f"Bind for {_host_address(port)} failed: port is already allocated",
    )


def userland_proxy_failed(*, name: str, container_id: str, port: policy.PortBinding) -> HttpError:
    """Docker's answer when something outside docker already listens on the host port."""
    family = "tcp6" if ":" in port.addresses[0] else "tcp4"
    return HttpError(
        500,
        f"driver failed programming external connectivity on endpoint {name} ({container_id}): "
        f"Error starting userland proxy: listen {family} {_host_address(port)}: bind: address already in use",
    )


def forwarder_script(published: Published) -> str:
    lines = []
    for port in published.ports:
        listen = f"TCP-LISTEN:{port.host_port},bind=127.0.0.1,reuseaddr,fork,max-children={FORWARDER_CHILDREN}"
        target = f"TCP:{published.address}:{port.container_port},connect-timeout=5"
        # -d -d: socat says when it listens, and why it could not.
        lines.append(f"socat -d -d {shlex.quote(listen)} {shlex.quote(target)} &")
    lines.append("wait")
    return "\n".join(lines)


class PortForwards:
    def __init__(
        self, *, engine: Engine, config: GatewayConfig, redis: aioredis.Redis, events: EventPublisher
    ) -> None:
        self.engine = engine
        self.config = config
        self.redis = redis
        self.events = events
        # What the student was last told their ports are, by session.
        self._told: dict[int, list[dict[str, Any]]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._records: dict[int, SessionRecord] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()
        # Host ports that the forwarders the session's last sync made could not listen on, by container.
        self.unbound: dict[int, dict[str, list[policy.PortBinding]]] = {}

    def lock(self, session_id: int) -> asyncio.Lock:
        """Held around a start that publishes ports and around every sync of the session."""
        return self._locks.setdefault(session_id, asyncio.Lock())

    # What the gateway calls.

    async def check_start(self, record: SessionRecord, container: dict[str, Any], namer: Namer) -> None:
        """Refuse to start a container whose host port another running container of the session holds.
        Call it with the session's lock held, and start the container before letting go."""
        wanted = policy.parse_ports_label((container.get("Labels") or {}).get(PORTS_LABEL, ""))
        if not wanted:
            return
        taken = {
            port.host_port
            for other in await self._running_with_ports(record.session_id)
            if other["Id"] != container["Id"]
            for port in policy.parse_ports_label(_labels(other).get(PORTS_LABEL, ""))
        }
        name = namer.plain((container.get("Names") or ["/"])[0]).lstrip("/")
        for port in wanted:
            if port.host_port in taken:
                raise port_allocated(name=name, container_id=container["Id"], port=port)
        workstation = await self._workstation(record.session_id)
        if workstation is None:
            return
        # What listens in the workstation that is not a forwarder is the student's own: docker would fail to
        # bind the host port, and the container would not start.
        forwarded = {
            port.host_port
            for forwarder in await self._forwarders(record.session_id)
            for port in policy.parse_ports_label((forwarder.get("Labels") or {}).get(PORTS_LABEL, ""))
        }
        held = await self._listening_in(workstation) - forwarded
        for port in wanted:
            if port.host_port in held:
                raise userland_proxy_failed(name=name, container_id=container["Id"], port=port)

    def check_started(self, record: SessionRecord, container: dict[str, Any], namer: Namer) -> None:
        """After a start and the sync that followed it, with the session's lock still held: refuse the start if
        its forwarder could not listen on a host port (a listener in the student's shell holds it)."""
        unbound = self.unbound.get(record.session_id, {}).get(container["Id"])
        if unbound:
            name = namer.plain((container.get("Names") or ["/"])[0]).lstrip("/")
            raise userland_proxy_failed(name=name, container_id=container["Id"], port=unbound[0])

    def request_sync(self, record: SessionRecord) -> None:
        """Sync the session soon, in the background; requests made meanwhile coalesce into one more run."""
        session_id = record.session_id
        self._records[session_id] = record
        task = self._tasks.get(session_id)
        if task is not None and not task.done():
            self._again.add(session_id)
            return
        self._tasks[session_id] = asyncio.create_task(self._sync_soon(session_id))

    async def sync(self, record: SessionRecord) -> list[Published]:
        async with self.lock(record.session_id):
            return await self.sync_locked(record)

    async def sync_locked(self, record: SessionRecord) -> list[Published]:
        session_id = record.session_id
        self.unbound[session_id] = {}
        namer = Namer(namespace=self.config.namespace, session_id=session_id)
        running = await self._running_with_ports(session_id)
        forwarders = await self._forwarders(session_id)
        workstation = await self._workstation(session_id)
        previous = await self._published_before(session_id)
        incumbents: dict[str, set[int]] = {}
        for forwarder in forwarders:
            labels = forwarder.get("Labels") or {}
            ports = policy.parse_ports_label(labels.get(PORTS_LABEL, ""))
            incumbents.setdefault(labels.get(TARGET, ""), set()).update(p.host_port for p in ports)
        for container_id, port in previous:
            incumbents.setdefault(container_id, set()).add(port)

        network = self.config.session_network(session_id)
        candidates = [c for c in (self._published(c, namer, network) for c in running) if c is not None]
        candidates.sort(key=lambda c: (not incumbents.get(c.container_id), c.started_at, c.container_id))
        taken: set[int] = set()
        allocated: list[Published] = []
        for candidate in candidates:
            free = tuple(p for p in candidate.ports if p.host_port not in taken)
            if free:
                allocated.append(replace(candidate, ports=free))
                taken.update(p.host_port for p in free)

        wanted = {p.container_id: p for p in allocated} if workstation is not None else {}
        kept: set[str] = set()
        for forwarder in forwarders:
            labels = forwarder.get("Labels") or {}
            target = labels.get(TARGET, "")
            want = wanted.get(target)
            if (
                want is not None
                and workstation is not None
                and target not in kept
                and labels.get(PORTS_LABEL) == policy.ports_label(list(want.ports))
                and labels.get(ADDRESS) == want.address
                and labels.get(WORKSTATION) == workstation.key
            ):
                kept.add(target)
                continue
            await self._remove(forwarder["Id"])
        if workstation is not None:
            for published in wanted.values():
                if published.container_id not in kept:
                    await self._create(record, published, workstation)
        await self._write(record, allocated)
        return allocated

    async def close(self, session_id: int) -> None:
        """The session is over: its forwarders and its entry in Redis go. Idempotent."""
        task = self._tasks.pop(session_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._again.discard(session_id)
        self._records.pop(session_id, None)
        self.unbound.pop(session_id, None)
        async with self.lock(session_id):
            for forwarder in await self._forwarders(session_id):
                await self._remove(forwarder["Id"])
            await self.redis.delete(self.config.ports_key(session_id))
            self._told.pop(session_id, None)
        self._locks.pop(session_id, None)

    async def shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # Reading the engine.

    def _filters(self, session_id: int, *labels: str) -> str:
        mine = [f"{SESSION}={session_id}", f"{NAMESPACE}={self.config.namespace}"]
        return json.dumps({"label": [*mine, *labels]})

    async def _running_with_ports(self, session_id: int) -> list[dict[str, Any]]:
        """Each running container with ports, inspected: the list is the engine's eventually consistent view
        (a container that just died is still listed as running when its die event arrives), while inspect
        waits for the container's own state."""
        filters = self._filters(session_id, f"{ROLE}=student", PORTS_LABEL)
        listed = await self.engine.json("GET", "/containers/json", query={"filters": filters}) or []
        details = []
        for container in listed:
            if not publishes(container):
                continue
            response = await self.engine.call("GET", f"/containers/{container['Id']}/json")
            if response.status == 200:
                detail = response.json()
                if (detail.get("State") or {}).get("Running"):
                    details.append(detail)
        return details

    async def _forwarders(self, session_id: int) -> list[dict[str, Any]]:
        filters = self._filters(session_id, f"{ROLE}={FORWARDER_ROLE}")
        query = {"all": "1", "filters": filters}
        return list(await self.engine.json("GET", "/containers/json", query=query) or [])

    async def _workstation(self, session_id: int) -> WorkstationInfo | None:
        """The session's running workstation, made by the launcher (students cannot take its name)."""
        response = await self.engine.call("GET", f"/containers/{q(self.config.workstation_name(session_id))}/json")
        if response.status != 200:
            return None
        detail = response.json()
        labels = (detail.get("Config") or {}).get("Labels") or {}
        state = detail.get("State") or {}
        if (
            labels.get(MANAGED) != "1"
            or labels.get(NAMESPACE) != self.config.namespace
            or not str(labels.get(ROLE, "")).startswith("workstation")
            or (detail.get("HostConfig") or {}).get("NetworkMode") != self.config.session_network(session_id)
            or not state.get("Running")
        ):
            return None
        return WorkstationInfo(
            id=str(detail["Id"]), image=str(detail.get("Image", "")), started_at=str(state.get("StartedAt", ""))
        )

    def _published(self, detail: dict[str, Any], namer: Namer, network: str) -> Published | None:
        ports = [p for p in policy.parse_ports_label(_labels(detail).get(PORTS_LABEL, "")) if p.proto == "tcp"]
        networks = (detail.get("NetworkSettings") or {}).get("Networks") or {}
        address = str((networks.get(network) or {}).get("IPAddress") or "")
        if not ports or not address:
            return None
        name = str(detail.get("Name", ""))
        return Published(
            container_id=str(detail["Id"]),
            name=namer.plain(name).lstrip("/") if namer.owns_plain(name) else str(detail["Id"])[:12],
            address=address,
            started_at=str((detail.get("State") or {}).get("StartedAt", "")),
            ports=tuple(ports),
        )

    async def _listening_in(self, workstation: WorkstationInfo) -> set[int]:
        """The TCP ports something listens on in the workstation's network namespace, read from its
        /proc/net/tcp and tcp6 by a process run there as nobody. Unknown counts as none."""
        created = await self.engine.call(
            "POST",
            f"/containers/{workstation.id}/exec",
            payload={
                "Cmd": ["cat", "/proc/net/tcp", "/proc/net/tcp6"],
                "AttachStdout": True,
                "User": FORWARDER_USER,
                "Tty": True,
            },
        )
        if created.status != 201:
            return set()
        stream = await self.engine.open(
            "POST",
            f"/exec/{created.json()['Id']}/start",
            body=json.dumps({"Detach": False, "Tty": True}).encode(),
            headers=[("Content-Type", "application/json")],
        )
        try:
            async with asyncio.timeout(LISTEN_WAIT_SECONDS):
                if (await stream.head()).status != 200:
                    return set()
                table = await stream.read_all(PROC_TABLE_MAX)
        except (TimeoutError, ConnectionError, OSError, HttpError):
            log.warning("could not read what listens in the workstation %s", workstation.id[:12])
            return set()
        finally:
            stream.close()
        listening = set()
        for line in table.decode("ascii", "replace").splitlines():
            fields = line.split()
            # local_address is ADDRESS:PORT in hex; state 0A is LISTEN.
            if len(fields) > 3 and fields[3] == "0A" and HEX_PORT_RE.fullmatch(fields[1].rsplit(":", 1)[-1]):
                listening.add(int(fields[1].rsplit(":", 1)[-1], 16))
        return listening

    async def _published_before(self, session_id: int) -> list[tuple[str, int]]:
        try:
            raw = await self.redis.get(self.config.ports_key(session_id))
            entries = json.loads(raw)["ports"] if raw else []
            return [(str(e["container_id"]), int(e["port"])) for e in entries]
        except Exception:
            return []

    # Changing the engine.

    async def _create(self, record: SessionRecord, published: Published, workstation: WorkstationInfo) -> None:
        session_id = record.session_id
        name = f"{self.config.workstation_name(session_id)}-fwd-{published.container_id[:12]}"
        labels = {
            MANAGED: "1",
            NAMESPACE: self.config.namespace,
            SESSION: str(session_id),
            OWNER: record.owner_key,
            EXPIRES: str(record.expires_at),
            ROLE: FORWARDER_ROLE,
            TARGET: published.container_id,
            ADDRESS: published.address,
            PORTS_LABEL: policy.ports_label(list(published.ports)),
            WORKSTATION: workstation.key,
        }
        payload = {
            "Image": self.config.forwarder_image or workstation.image,
            "Entrypoint": ["sh", "-c"],
            "Cmd": [forwarder_script(published)],
            "User": FORWARDER_USER,
            "Labels": labels,
            "HostConfig": {
                "NetworkMode": f"container:{workstation.id}",
                "CapDrop": ["ALL"],
                "SecurityOpt": [policy.NO_NEW_PRIVILEGES],
                "ReadonlyRootfs": True,
                "Memory": FORWARDER_MEMORY,
                "MemorySwap": FORWARDER_MEMORY,
                "NanoCpus": FORWARDER_NANO_CPUS,
                "PidsLimit": FORWARDER_PIDS,
                "LogConfig": LOG_CONFIG,
                "RestartPolicy": {"Name": "no"},
            },
        }
        for attempt in range(2):
            response = await self.engine.call("POST", "/containers/create", query={"name": name}, payload=payload)
            if response.status == 409 and attempt == 0:
                await self._remove(name)
                continue
            break
        if response.status >= 300:
            log.warning("session %s: could not create %s: %s", session_id, name, response.message)
            return
        forwarder_id = response.json()["Id"]
        started = await self.engine.call("POST", f"/containers/{forwarder_id}/start")
        if started.status >= 300:
            log.warning("session %s: could not start %s: %s", session_id, name, started.message)
            await self._remove(forwarder_id)
            return
        unbound = await self._unbound(forwarder_id, published)
        if unbound:
            log.info("session %s: ports %s are held in the workstation", session_id, policy.ports_label(unbound))
            self.unbound.setdefault(session_id, {})[published.container_id] = unbound
        log.info("session %s: forwarding %s", session_id, policy.ports_label(list(published.ports)))

    async def _unbound(self, forwarder_id: str, published: Published) -> list[policy.PortBinding]:
        """The host ports the forwarder could not listen on, read from what socat says as it starts: that it
        listens, or (exiting at once) that another listener holds the port. Unknown counts as bound."""
        wanted = {port.host_port for port in published.ports}
        listening: set[int] = set()
        failed: set[int] = set()
        stream = await self.engine.open(
            "GET", f"/containers/{forwarder_id}/logs", query={"follow": "1", "stderr": "1", "stdout": "1"}
        )
        try:
            async with asyncio.timeout(LISTEN_WAIT_SECONDS):
                if (await stream.head()).status != 200:
                    return []
                frames = b""
                async for chunk in stream.chunks():
                    frames += chunk
                    # Not a TTY: the engine frames each write with an 8-byte header (stream, size).
                    while len(frames) >= 8:
                        size = struct.unpack(">I", frames[4:8])[0]
                        if len(frames) < 8 + size:
                            break
                        text, frames = frames[8 : 8 + size], frames[8 + size :]
                        listening.update(int(m) for m in LISTENING_RE.findall(text))
                        failed.update(int(m) for m in BIND_FAILED_RE.findall(text))
                    if wanted <= listening | failed:
                        break
        except (TimeoutError, ConnectionError, OSError):
            log.warning("the forwarder %s did not say whether it listens on %s", forwarder_id, sorted(wanted))
        finally:
            stream.close()
        return [port for port in published.ports if port.host_port in failed]

    async def _remove(self, ref: str) -> None:
        response = await self.engine.call("DELETE", f"/containers/{q(ref)}", query={"force": "1", "v": "1"})
        if response.status >= 300 and response.status not in (404, 409):
            raise EngineError(response.status, response.message)

    async def _write(self, record: SessionRecord, allocated: list[Published]) -> None:
        entries = []
        for published in sorted(allocated, key=lambda p: min(port.host_port for port in p.ports)):
            for entry in published.as_json():
                entries.append({**entry, "container_id": published.container_id})
        entries.sort(key=lambda e: e["port"])
        ttl = max(record.expires_at - int(time.time()), 0) + 600
        await self.redis.set(self.config.ports_key(record.session_id), json.dumps({"ports": entries}), ex=ttl)
        # Once the forwarders serve them: the page that follows the student's events fetches its links then.
        told = [{key: entry[key] for key in ("port", "container", "container_port")} for entry in entries]
        if self._told.get(record.session_id) != told:
            self._told[record.session_id] = told
            await self.events.publish(record.session_id, "ports.changed", ports=told)

    async def _sync_soon(self, session_id: int) -> None:
        while True:
            self._again.discard(session_id)
            record = self._records.get(session_id)
            if record is None:
                return
            try:
                await self.sync(record)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("session %s: could not sync published ports", session_id, exc_info=True)
            if session_id not in self._again:
                return
