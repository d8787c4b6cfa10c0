"""One student's view of the engine: routing, ownership, names, and the policy applied to every request.

Ownership is read from the engine itself on every request (labels and name prefixes), so the gateway keeps
no state that a restart could lose. A container, image, volume, network or exec instance that is not the
student's answers exactly as docker answers for one that does not exist. The session's other containers
(the workstation the launcher made, the gateway's port forwarders) carry the session's label too, so a
container is the student's only if it also carries the role "student".
"""

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import policy
from .config import API_VERSION, MIN_API_VERSION, GatewayConfig
from .disk import CHECK_SECONDS, DiskShare, DiskWatch, curated_images, megabytes
from .engine import Engine, EngineError, q
from .events import EventPublisher
from .http import (
    MAX_HEADER_BYTES,
    ClientGone,
    EngineStream,
    HttpError,
    Request,
    Response,
    ServerSide,
    bounded_json,
)
from .imagelist import ImageList
from .labels import CATALOG, EXPIRES, IMAGE_LABEL, MANAGED, NAMESPACE, OWNER, PORTS_LABEL, ROLE, SESSION
from .names import HEX_RE, BadReference, Namer, Reference, is_student_repo_tag, parse_reference, split_repo_tag
from .registry import SessionRecord

if TYPE_CHECKING:
    from .ports import PortForwards

log = logging.getLogger(__name__)

# The requests that may change the engine's images (see `ImageList`); a build only as it ends (see `build`).
IMAGE_CHANGES_RE = re.compile(r"/(?:images|commit)(?:/|$)")
# What docker's default bridge also shows at the top of a container's NetworkSettings.
DEFAULT_NETWORK_FIELDS = (
    "EndpointID",
    "Gateway",
    "GlobalIPv6Address",
    "GlobalIPv6PrefixLen",
    "IPAddress",
    "IPPrefixLen",
    "IPv6Gateway",
    "MacAddress",
)
MB = 1024 * 1024
VERSION_RE = re.compile(r"^/v([0-9]+)\.([0-9]+)(/.*)$")
ANONYMOUS_VOLUME_RE = re.compile(r"[0-9a-f]{64}")
# One student's sandbox needs a handful of connections; a cap keeps one from using up the gateway's files.
MAX_CONNECTIONS = 64
# Builds hold their whole context in memory while it is checked.
MAX_CONCURRENT_BUILDS = 2
MAX_GATEWAY_BUILDS = 4
BUILD_CONTEXT_SECONDS = 30.0
# How long a build goes on once its student has gone, before it is stopped.
BUILD_DRAIN_SECONDS = 10.0
# docker system df answers with the sizes of volumes the disk watch last found, looking again if they are older.
VOLUME_SIZES_MAX_AGE = 30.0
# A lesson names a handful of images; these leave room for a whole course.
MAX_IMAGE_TAGS = 100
MAX_IMAGES = 100
MAX_VOLUMES = 50
# The engine reads and decodes every image's configuration, its history included and intermediate images' too,
# for every student's docker images and nearly every other command: an image may weigh this much, counted as
# the length of its history (each step left an image) times the size of its configuration and history, and a
# sandbox's images this much in all.
IMAGE_WEIGHT_MAX = 4 * MB
SANDBOX_WEIGHT_MAX = 16 * MB
# An image's history length and size, by ID: what an ID names never changes.
IMAGE_SHAPES: dict[str, tuple[int, int]] = {}
IMAGE_SHAPES_MAX = 4096
PASS_HEADERS = ("content-type", "api-version", "docker-experimental", "ostype", "server")

_ADJECTIVES_WORDS = (
    "admiring adoring affectionate amazing awesome blissful bold brave busy charming clever compassionate "
    "competent confident cool dazzling determined eager ecstatic elastic elated elegant epic exciting "
    "fervent festive flamboyant focused friendly frosty funny gallant gifted goofy gracious great happy "
    "hopeful hungry infallible inspiring intelligent interesting jolly jovial keen kind laughing loving "
    "lucid magical modest musing mystifying nice nifty nostalgic objective optimistic peaceful pensive "
    "practical priceless quirky quizzical relaxed reverent romantic sharp silly sleepy stoic sweet tender "
    "thirsty trusting unruffled upbeat vibrant vigilant vigorous wizardly wonderful xenodochial youthful "
    "zealous zen "
)
ADJECTIVES = tuple(_ADJECTIVES_WORDS.split())
_SURNAMES_WORDS = (
    "albattani allen archimedes babbage banach bardeen bartik bell blackwell bohr borg bose brahmagupta "
    "burnell cannon carson cerf chandrasekhar clarke curie darwin davinci dijkstra einstein elion "
    "engelbart euclid euler fermat fermi feynman franklin galileo gauss goldberg goodall hamilton hawking "
    "heisenberg hermann hodgkin hopper hypatia jackson jang jennings johnson joliot kalam keller kepler "
    "khorana kilby knuth kowalevski lamarr lamport leakey lovelace lumiere mahavira margulis mayer "
    "mccarthy mcclintock meitner mendel mirzakhani montalcini moore morse napier nash neumann newton "
    "nobel noether noyce pascal pasteur perlman pike poincare ptolemy raman ramanujan ride ritchie "
    "robinson rosalind saha sammet shannon shaw sinoussi snyder spence stonebraker sutherland swanson "
    "tesla thompson torvalds turing varahamihira villani wescoff wilbur williams wilson wing wozniak "
    "wright yalow yonath "
)
SURNAMES = tuple(_SURNAMES_WORDS.split())


def not_found_container(ref: str) -> HttpError:
    return HttpError(404, f"No such container: {ref}")


def not_found_image(ref: str) -> HttpError:
    return HttpError(404, f"No such image: {ref}")


def not_pullable(name: str) -> HttpError:
    return HttpError(
        404,
        f"pull access denied for {name}, repository does not exist or may require 'docker login': in the "
        "Layercake sandbox only the course's curated images can be pulled",
    )


def not_found_exec(ref: str) -> HttpError:
    return HttpError(404, f"No such exec instance: {ref}")


def not_found_volume(ref: str) -> HttpError:
    return HttpError(404, f"get {ref}: no such volume")


def not_found_network(ref: str) -> HttpError:
    return HttpError(404, f"network {ref} not found")


def publishes(container: dict[str, Any]) -> bool:
    """Whether a container (as the engine lists it) has published ports."""
    return bool(policy.parse_ports_label((container.get("Labels") or {}).get(PORTS_LABEL, "")))


def strip_labels(labels: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (labels or {}).items() if not k.startswith("layercake.")}


def json_arg(request: Request, name: str) -> Any:
    raw = request.arg(name)
    try:
        return bounded_json(raw) if raw else None
    except ValueError as exc:
        raise HttpError(400, f"invalid {name}: {exc}") from exc


def hide_host_paths(detail: dict[str, Any]) -> dict[str, Any]:
    """Where the engine keeps an object on the host is none of the student's business (and info hides it)."""
    if isinstance(detail.get("GraphDriver"), dict):
        detail["GraphDriver"] = {"Name": detail["GraphDriver"].get("Name", ""), "Data": None}
    for key in ("ResolvConfPath", "HostnamePath", "HostsPath", "LogPath"):
        if key in detail:
            detail[key] = ""
    for mount in detail.get("Mounts") or []:
        if isinstance(mount, dict) and mount.get("Type") == "volume":
            mount["Source"] = ""
    if "Mountpoint" in detail:
        detail["Mountpoint"] = ""
    settings = detail.get("NetworkSettings")
    if isinstance(settings, dict) and "SandboxKey" in settings:
        # The path of the container's network namespace on the host.
        settings["SandboxKey"] = ""
    return detail


def short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def image_id_matches(image_id: str, ref: str) -> bool:
    bare = ref.removeprefix("sha256:")
    return image_id.removeprefix("sha256:").startswith(bare) and bool(bare)


class Slot:
    """One place of a semaphore, given back once: early, or when the block ends."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore = semaphore
        self.held = False

    async def __aenter__(self) -> "Slot":
        await self.semaphore.acquire()
        self.held = True
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.semaphore.release()


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Awaitable[None]]
    body_limit: str = "json"


@dataclass
class ImageView:
    """An image as one student may see it."""

    entry: dict[str, Any]
    own: bool
    curated_tags: list[str]
    own_tags: list[str]

    @property
    def id(self) -> str:
        return str(self.entry["Id"])

    @property
    def curated(self) -> bool:
        return bool(self.curated_tags)


DENIED = [
    ("/swarm", "Swarm mode"),
    ("/nodes", "docker node (Swarm mode)"),
    ("/services", "docker service (Swarm mode)"),
    ("/tasks", "docker service ps (Swarm mode)"),
    ("/secrets", "docker secret (Swarm mode)"),
    ("/configs", "docker config (Swarm mode)"),
    ("/plugins", "docker plugin"),
    ("/auth", "docker login"),
    ("/session", "BuildKit"),
    ("/grpc", "BuildKit"),
    ("/build/prune", "docker builder prune"),
    ("/images/load", "docker load"),
    ("/images/get", "docker save"),
    ("/images/search", "docker search"),
    ("/distribution", "registry access"),
    (
        "/networks/prune",
        "docker system prune and docker network prune (docker container prune and docker image prune "
        "clean up your own containers and images)",
    ),
    ("/networks/create", "docker network create (your containers share your sandbox's own network)"),
    ("/volumes/prune", "docker volume prune"),
]


class StudentGateway:
    def __init__(
        self,
        *,
        record: SessionRecord,
        config: GatewayConfig,
        engine: Engine,
        events: EventPublisher,
        ports: "PortForwards | None" = None,
        builds: asyncio.Semaphore | None = None,
        disk: DiskWatch | None = None,
        engine_images: ImageList | None = None,
    ) -> None:
        self.record = record
        self.config = config
        self.engine = engine
        self.events = events
        self.ports = ports
        self.namer = Namer(namespace=config.namespace, session_id=record.session_id)
        self.network = config.session_network(record.session_id)
        budget = record.memory_budget_mb * MB
        max_containers = max(record.max_containers, 1)
        container_max = min(config.container_memory_max_mb * MB, budget)
        self.limits = policy.Limits(
            container_memory_max=container_max,
            default_memory=max(min(budget // max_containers, container_max), 6 * MB),
            nano_cpus=config.container_cpu_milli * 1_000_000,
            pids=config.container_pids_max,
            restart_retries=config.restart_retries_max,
            shm_max=config.shm_max_mb * MB,
        )
        self.routes = self._routes()
        # Checking the budget and creating under one lock, or two requests at once would both fit.
        self.budget_lock = asyncio.Lock()
        # What the session's running builds may use of its memory budget (see `_reserve_build_memory`).
        self.build_memory = 0
        self.builds = asyncio.Semaphore(MAX_CONCURRENT_BUILDS)
        # Each build holds its context (and a rewritten copy) in memory: the gateway as a whole reads a few at
        # once, and a session one, so that a student whose contexts crawl in holds one of the few, not all.
        self.gateway_builds = builds or asyncio.Semaphore(MAX_GATEWAY_BUILDS)
        self.uploads = asyncio.Semaphore(1)
        self.disk = disk or DiskWatch(engine, namespace=config.namespace)
        # What the disk watch last found over the sandbox's disk budget (None: within it), and the containers of
        # its builds' steps, which take its disk too.
        self.disk_full: str | None = None
        self.build_containers: set[str] = set()
        # How many of the sandbox's builds under way each step image belongs to.
        self.build_images: Counter[str] = Counter()
        self.engine_images = engine_images or ImageList(engine)

    # Routing.

    def _routes(self) -> list[Route]:
        c = r"/containers/(?P<ref>[^/]+)"
        i = r"/images/(?P<ref>.+)"
        table: list[tuple[str, str, Callable[..., Awaitable[None]]]] = [
            ("GET", r"/_ping", self.ping),
            ("HEAD", r"/_ping", self.ping),
            ("GET", r"/version", self.version),
            ("GET", r"/info", self.info),
            ("GET", r"/system/df", self.system_df),
            ("GET", r"/events", self.events_stream),
            ("GET", r"/containers/json", self.container_list),
            ("POST", r"/containers/create", self.container_create),
            ("POST", r"/containers/prune", self.container_prune),
            ("GET", c + r"/json", self.container_inspect),
            ("GET", c + r"/logs", self.container_logs),
            ("GET", c + r"/top", self.container_top),
            ("GET", c + r"/changes", self.container_changes),
            ("GET", c + r"/stats", self.container_stats),
            ("POST", c + r"/(?P<action>start|stop|restart|kill|pause|unpause)", self.container_action),
            ("POST", c + r"/wait", self.container_wait),
            ("POST", c + r"/resize", self.container_resize),
            ("POST", c + r"/rename", self.container_rename),
            ("POST", c + r"/update", self.container_update),
            ("POST", c + r"/attach", self.container_attach),
            ("HEAD", c + r"/archive", self.container_path_stat),
            ("POST", c + r"/exec", self.exec_create),
            ("DELETE", c, self.container_remove),
            ("POST", r"/exec/(?P<ref>[^/]+)/start", self.exec_start),
            ("POST", r"/exec/(?P<ref>[^/]+)/resize", self.exec_resize),
            ("GET", r"/exec/(?P<ref>[^/]+)/json", self.exec_inspect),
            ("GET", r"/images/json", self.image_list),
            ("POST", r"/images/create", self.image_pull),
            ("POST", r"/images/prune", self.image_prune),
            ("GET", i + r"/json", self.image_inspect),
            ("GET", i + r"/history", self.image_history),
            ("POST", i + r"/tag", self.image_tag),
            ("DELETE", i, self.image_remove),
            ("POST", r"/commit", self.commit),
            ("POST", r"/build", self.build),
            ("GET", r"/volumes", self.volume_list),
            ("POST", r"/volumes/create", self.volume_create),
            ("GET", r"/volumes/(?P<ref>[^/]+)", self.volume_inspect),
            ("DELETE", r"/volumes/(?P<ref>[^/]+)", self.volume_remove),
            ("GET", r"/networks", self.network_list),
            ("GET", r"/networks/(?P<ref>[^/]+)", self.network_inspect),
            ("GET", r"/plugins/(?P<ref>[^/]+)/json", self.plugin_inspect),
        ]
        routes = []
        for method, pattern, handler in table:
            limit = "build" if pattern == r"/build" else "json"
            routes.append(Route(method, re.compile(f"^{pattern}/?$"), handler, limit))
        return routes

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            match = route.pattern.match(path)
            if match and route.method == method:
                return route, match.groupdict()
        return None

    def _denied(self, method: str, path: str) -> HttpError:
        for prefix, what in DENIED:
            if path.startswith(prefix):
                return policy.not_available(what)
        if path.endswith("/archive"):
            return policy.not_available("docker cp")
        if path.endswith("/export"):
            return policy.not_available("docker export")
        if path.endswith("/push"):
            return policy.not_available("docker push")
        if path.startswith("/networks"):
            return policy.not_available("changing networks")
        if path.startswith("/containers/") and path.endswith("/attach/ws"):
            return policy.not_available("attaching over a websocket")
        return policy.not_available(f"{method} {path}")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        side = ServerSide(reader, writer)
        try:
            while True:
                try:
                    request = await side.next_request()
                    if request is None:
                        return
                    hijacked = await self._dispatch(side, request)
                    if hijacked or not side.reusable:
                        return
                except HttpError as error:
                    # A framing error leaves the connection in an unknown state: answer once, then close.
                    if side.can_respond:
                        await side.respond_error(error)
                    return
        except ClientGone:
            return
        except Exception:
            log.exception("session %s: request failed", self.record.session_id)
        finally:
            await side.close()

    async def _dispatch(self, side: ServerSide, request: Request) -> bool:
        path = request.path
        match = VERSION_RE.match(path)
        if match:
            # Python reads no number of more than 4300 digits, leading zeros counted: those go first, and one
            # of ten digits is past any version already.
            digits = [part.lstrip("0") or "0" for part in match.groups()[:2]]
            major, minor = (int(part) if len(part) < 10 else 10**9 for part in digits)
            version = (major, minor)
            if version > tuple(int(p) for p in API_VERSION.split(".")):
                await self._drain_and_fail(
                    side,
                    HttpError(
                        400,
                        f"client version {match.group(1)}.{match.group(2)} is too new. Maximum supported API "
                        f"version is {API_VERSION}",
                    ),
                )
                return False
            if version < MIN_API_VERSION:
                await self._drain_and_fail(
                    side,
                    HttpError(
                        400,
                        f"client version {version[0]}.{version[1]} is too old. Minimum supported API version "
                        f"is {MIN_API_VERSION[0]}.{MIN_API_VERSION[1]}, please upgrade your client to a newer "
                        "version",
                    ),
                )
                return False
            path = match.group(3)
        request.path = path
        found = self._match(request.method, path)
        if found is None:
            await self._drain_and_fail(side, self._denied(request.method, path))
            return False
        route, params = found
        if route.body_limit == "build":
            # The gateway-wide slots bound the contexts held in memory, and a sandbox takes one at a time: each
            # is given back once the context is with the engine, and a context must arrive in time, so that no
            # build holds one for long.
            async with self.builds, Slot(self.uploads) as upload, Slot(self.gateway_builds) as slot:

                def sent() -> None:
                    slot.release()
                    upload.release()

                request.body_sent = sent
                return await self._handle(
                    side, request, route, params, self.config.build_context_max, within=BUILD_CONTEXT_SECONDS
                )
        return await self._handle(side, request, route, params, self.config.json_body_max)

    async def _handle(
        self,
        side: ServerSide,
        request: Request,
        route: Route,
        params: dict[str, str],
        limit: int,
        *,
        within: float | None = None,
    ) -> bool:
        try:
            async with asyncio.timeout(within):
                request.body = await side.read_body(limit)
        except TimeoutError as exc:
            raise HttpError(408, f"the request body did not arrive within {within:g} seconds") from exc
        side.status = 0
        try:
            try:
                if request.method in ("POST", "DELETE") and IMAGE_CHANGES_RE.match(request.path):
                    with self.engine_images.changing():
                        await route.handler(side, request, **params)
                else:
                    await route.handler(side, request, **params)
            finally:
                # What a removal frees counts at the next command that takes disk; a removal refused frees nothing.
                if (request.method == "DELETE" or request.path.endswith("/prune")) and 200 <= side.status < 300:
                    self.disk.forget()
        except BadReference as exc:
            await side.respond_error(HttpError(400, str(exc)))
        except HttpError as error:
            if side.can_respond:
                await side.respond_error(HttpError(error.status, self.namer.unmask(error.message)))
            else:
                raise ClientGone() from error
        return side.switched

    async def _drain_and_fail(self, side: ServerSide, error: HttpError) -> None:
        await side.read_body(self.config.build_context_max, keep=False)
        await side.respond_error(error)

    # Helpers.

    @property
    def session_id(self) -> int:
        return self.record.session_id

    @property
    def disk_budget(self) -> int:
        return self.record.disk_budget_mb * MB

    async def _refuse_over_disk(self) -> None:
        """Nothing that takes more of the engine's disk while the sandbox keeps more than its budget; what the
        student removed since the last look counts at once."""
        if self.disk_full is None:
            return
        try:
            await self.disk.refresh(max_age=CHECK_SECONDS)
        except HttpError:
            log.warning("session %s: the engine's disk usage is not known", self.session_id, exc_info=True)
        if self.disk_full is not None:
            raise policy.Refused(self.disk_full)

    async def _refuse_commit_over_disk(self, container_id: str) -> None:
        """A commit writes the container's files out again, as the image's layer (a sparse file at its whole
        length), in one request that no look can stop: the sandbox, with that layer once more, must be within
        its budget."""
        try:
            await self.disk.refresh(max_age=CHECK_SECONDS)
            sized = await self.engine.json(
                "GET",
                "/containers/json",
                query={"all": "1", "size": "1", "filters": json.dumps({"id": [container_id]})},
            )
        except HttpError:
            log.warning("session %s: the engine's disk usage is not known", self.session_id, exc_info=True)
            return
        layer = max(int(((sized or [{}])[0]).get("SizeRw") or 0), 0)
        kept = self.disk.shares.get(self.session_id, DiskShare()).total - self.disk.last_sizes.get(container_id, 0)
        after = kept + 2 * layer
        if after > self.disk_budget:
            raise policy.Refused(
                f"docker commit would write the container's {megabytes(layer)} MB of files again, as the image's: "
                f"your sandbox would keep {megabytes(after)} MB on the disk, more than the "
                f"{self.disk_budget // MB} MB it may. Remove what you no longer need (docker rm, docker rmi, "
                "docker volume rm; docker system df lists them) and try again"
            )

    def _labels(self, role: str) -> dict[str, str]:
        record = self.record
        return {
            MANAGED: "1",
            NAMESPACE: self.config.namespace,
            SESSION: str(record.session_id),
            OWNER: record.owner_key,
            EXPIRES: str(record.expires_at),
            ROLE: role,
        }

    def _owner(self) -> dict[str, str]:
        """The labels that mark an object (or an engine event) as this student's: their session, on this site."""
        return {NAMESPACE: self.config.namespace, SESSION: str(self.record.session_id)}

    def _owner_labels(self) -> list[str]:
        return [f"{key}={value}" for key, value in self._owner().items()]

    def _own_filter(self, extra: dict[str, list[str]] | None = None) -> str:
        filters: dict[str, list[str]] = {"label": self._owner_labels()}
        for key, values in (extra or {}).items():
            filters.setdefault(key, []).extend(values)
        return json.dumps(filters)

    def _containers_filter(self, extra: dict[str, list[str]] | None = None) -> str:
        """The student's containers: never the workstation or a forwarder, which share the session label."""
        merged: dict[str, list[str]] = {"label": [f"{ROLE}=student"]}
        for key, values in (extra or {}).items():
            merged.setdefault(key, []).extend(values)
        return self._own_filter(merged)

    def _student_filters(self, request: Request, allowed: set[str]) -> dict[str, list[str]]:
        if not request.arg("filters").strip():
            return {}
        data = policy.Fields(json_arg(request, "filters"), "filters")
        result: dict[str, list[str]] = {}
        for key in list(data.items):
            value = data.take(key)
            name = data.items[key][0]
            if name not in allowed:
                raise HttpError(400, f"invalid filter '{name}'")
            if isinstance(value, dict):
                values = [k for k, v in value.items() if v]
            elif isinstance(value, list):
                values = [str(v) for v in value]
            else:
                raise HttpError(400, "invalid filter")
            for item in values:
                if name == "label" and item.lower().startswith("layercake."):
                    raise HttpError(400, "labels starting with 'layercake.' are reserved by the sandbox")
            result[name] = values
        return result

    async def _respond_engine(self, side: ServerSide, response: Any, *, payload: Any = None) -> None:
        if response.status >= 400:
            raise HttpError(response.status, self.namer.unmask(response.message))
        if payload is None and not response.body.strip():
            await side.respond(
                response.status, b"", content_type=response.headers.get("content-type", "text/plain")
            )
            return
        body = json.dumps(payload if payload is not None else response.json())
        await side.respond(response.status, self.namer.unmask(body).encode() + b"\n")

    async def _stream_engine(
        self,
        side: ServerSide,
        stream: EngineStream,
        *,
        rewrite: Callable[[bytes], bytes] | None = None,
        finish: Callable[[], bytes] | None = None,
        each: Callable[[], Awaitable[None]] | None = None,
        drain: float = 0.0,
    ) -> None:
        """Relay a streaming answer as it comes, without buffering it; `each` is awaited after each chunk is
        read (and rewritten), before it is relayed. A student who goes away (closes the connection, as the
        engine sees it too) ends the answer (ClientGone); with `drain`, only once it has been read for that many
        seconds more, or to its end."""
        try:
            head = await stream.head()
            if head.status >= 400:
                body = await stream.read_all(1024 * 1024)
                head.body = body
                raise HttpError(head.status, self.namer.unmask(head.message))
            headers = [(k, v) for k, v in head.raw_headers if k.lower() in PASS_HEADERS]
            await side.start_stream(head.status, headers)
            loop = asyncio.get_running_loop()
            gone_until: float | None = None
            waiting: asyncio.Timeout | None = None

            def gone(_: object = None) -> None:
                nonlocal gone_until
                if gone_until is None:
                    gone_until = loop.time() + drain
                    if waiting is not None:
                        waiting.reschedule(gone_until)

            # A student who closes the connection is gone even while the engine says nothing (docker logs -f
            # of a quiet container, interrupted), and holds none of their sandbox's connections.
            watch = asyncio.create_task(until_closed(side))
            watch.add_done_callback(gone)
            try:
                chunks = stream.chunks()
                while True:
                    try:
                        async with asyncio.timeout_at(gone_until) as waiting:
                            chunk = await anext(chunks)
                    except (StopAsyncIteration, TimeoutError):
                        break
                    finally:
                        waiting = None
                    data = rewrite(chunk) if rewrite else chunk
                    if each is not None:
                        await each()
                    if gone_until is not None:
                        continue
                    try:
                        await side.stream_data(data)
                    except ClientGone:
                        if not drain:
                            raise
                        gone()
            finally:
                watch.remove_done_callback(gone)
                watch.cancel()
            if gone_until is not None:
                raise ClientGone()
            if finish is not None:
                await side.stream_data(finish())
            await side.end_stream()
        except (ConnectionError, OSError) as exc:
            raise ClientGone() from exc
        finally:
            stream.close()

    # Containers: ownership.

    async def own_containers(self, *, extra: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
        result = await self.engine.json(
            "GET", "/containers/json", query={"all": "1", "filters": self._containers_filter(extra)}
        )
        return list(result or [])

    async def resolve_container(self, ref: str) -> dict[str, Any]:
        containers = await self.own_containers()
        for container in containers:
            if container["Id"] == ref:
                return container
        try:
            engine_name = "/" + self.namer.container(ref)
        except BadReference:
            engine_name = ""
        for container in containers:
            if engine_name in container.get("Names", []):
                return container
        if re.fullmatch(r"[a-f0-9]+", ref):
            matches = [c for c in containers if c["Id"].startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise HttpError(400, f"Multiple IDs found with provided prefix: {ref}")
        raise not_found_container(ref)

    async def _moved_images(self, containers: list[dict[str, Any]]) -> set[str]:
        """The containers whose image, as the student named it, now names another image (or none): docker
        then lists such a container with its image's ID. The engine shows the ID (it knows only the name
        the gateway gave it) in these cases and when it was given an ID, so only those are looked up."""
        suspects = [
            c
            for c in containers
            if str(c.get("Image", "")).startswith("sha256:") and (c.get("Labels") or {}).get(IMAGE_LABEL)
        ]
        if not suspects:
            return set()
        views = await self.image_views()
        moved = set()
        for container in suspects:
            try:
                now = self._find_image(views, container["Labels"][IMAGE_LABEL]).id
            except (HttpError, BadReference):
                now = ""
            if now != container.get("ImageID"):
                moved.add(container["Id"])
        return moved

    def _container_view(self, container: dict[str, Any], *, image_moved: bool = False) -> dict[str, Any]:
        labels = container.get("Labels") or {}
        names = [self.namer.plain(n) for n in container.get("Names", []) if self.namer.owns_plain(n)]
        container["Names"] = names
        if labels.get(IMAGE_LABEL):
            container["Image"] = container.get("ImageID", "") if image_moved else labels[IMAGE_LABEL]
        container["Labels"] = strip_labels(labels)
        ports = policy.parse_ports_label(labels.get(PORTS_LABEL, ""))
        if ports and container.get("State") == "running":
            published = {(p.container_port, p.proto) for p in ports}
            kept = [
                p for p in container.get("Ports") or [] if (p.get("PrivatePort"), p.get("Type")) not in published
            ]
            container["Ports"] = kept + [
                {"IP": address, "PrivatePort": p.container_port, "PublicPort": p.host_port, "Type": p.proto}
                for p in ports
                for address in p.addresses
            ]
        self._as_default_network(container)
        return container

    def _as_default_network(self, container: dict[str, Any]) -> None:
        """The student's network is the one their containers join when they name none, so it is shown as
        docker's default network is on their own machine: named bridge, the container's address also at the
        top of NetworkSettings (where `docker inspect -f '{{.NetworkSettings.IPAddress}}'` looks)."""
        host = container.get("HostConfig") or {}
        if host.get("NetworkMode") == self.network:
            host["NetworkMode"] = "bridge"
        settings = container.get("NetworkSettings") or {}
        networks = settings.get("Networks") or {}
        if self.network not in networks:
            return
        networks["bridge"] = endpoint = networks.pop(self.network)
        if "IPAddress" in settings:
            for key in DEFAULT_NETWORK_FIELDS:
                settings[key] = endpoint.get(key, settings.get(key))

    # Endpoints: the daemon.

    async def ping(self, side: ServerSide, request: Request) -> None:
        headers = [
            ("Builder-Version", "1"),
            ("Cache-Control", "no-cache, no-store, must-revalidate"),
            ("Pragma", "no-cache"),
        ]
        await side.respond(
            200,
            b"" if request.method == "HEAD" else b"OK",
            content_type="text/plain; charset=utf-8",
            headers=headers,
        )

    async def version(self, side: ServerSide, request: Request) -> None:
        response = await self.engine.call("GET", "/version")
        await self._respond_engine(side, response)

    async def plugin_inspect(self, side: ServerSide, request: Request, ref: str) -> None:
        """The sandbox has no plugins: `docker inspect NAME` asks for one last, and must hear "not found" to
        say "No such object", as it does on an engine without plugins."""
        raise HttpError(404, f"plugin {json.dumps(ref)} not found")

    async def system_df(self, side: ServerSide, request: Request) -> None:
        """docker system df of what the student sees: the images docker images lists for them, with the layers
        they share counted once, and their own containers and volumes. (The engine's answer is the whole
        engine's, and costs it a walk through every container's files.)"""
        top, entries, containers, volumes, _ = await asyncio.gather(
            self.image_views(),
            self.engine.json("GET", "/images/json", query={"all": "1"}),
            self.engine.json(
                "GET", "/containers/json", query={"all": "1", "size": "1", "filters": self._containers_filter()}
            ),
            self.engine.json("GET", "/volumes", query={"filters": self._own_filter()}),
            self.disk.refresh(max_age=VOLUME_SIZES_MAX_AGE, removals=False),
        )
        volume_sizes = self.disk.volume_sizes
        sizes = {str(e["Id"]): int(e.get("Size") or 0) for e in entries or []}
        parents = {str(e["Id"]): str(e.get("ParentId") or "") for e in entries or []}

        def layer(image_id: str) -> int:
            """The size of the layer an image adds to its parent's."""
            parent = parents.get(image_id, "")
            return max(sizes[image_id] - sizes[parent], 0) if parent in sizes else sizes[image_id]

        stacks: dict[str, set[str]] = {}
        for view in top:
            stack, node = set(), view.id
            while node in sizes and node not in stack:
                stack.add(node)
                node = parents.get(node, "")
            stacks[view.id] = stack
        used = Counter(node for stack in stacks.values() for node in stack)
        in_use = Counter(str(c.get("ImageID", "")) for c in containers or [])
        images = []
        for view in top:
            entry = self._image_entry(view)
            entry["SharedSize"] = sum(layer(node) for node in stacks[view.id] if used[node] > 1)
            entry["Containers"] = in_use[view.id]
            images.append(entry)
        mounted = Counter(
            m.get("Name") for c in containers or [] for m in c.get("Mounts") or [] if m.get("Type") == "volume"
        )
        usage = {
            "LayersSize": sum(layer(node) for node in used),
            "Images": images,
            "Containers": [self._container_view(c) for c in containers or []],
            "Volumes": [
                {
                    **self._volume_view(v),
                    "UsageData": {"Size": volume_sizes.get(v["Name"], 0), "RefCount": mounted[v["Name"]]},
                }
                for v in (volumes or {}).get("Volumes") or []
            ],
            "BuildCache": [],
            "BuilderSize": 0,
        }
        await side.respond(200, self.namer.unmask(json.dumps(usage)).encode() + b"\n")

    async def info(self, side: ServerSide, request: Request) -> None:
        info = await self.engine.json("GET", "/info")
        containers = await self.own_containers()
        images = [view for view in await self.image_views() if view.own or view.curated]
        states = [c.get("State") for c in containers]
        redacted = {
            "ID": "",
            "Name": "layercake-sandbox",
            "Containers": len(containers),
            "ContainersRunning": states.count("running"),
            "ContainersPaused": states.count("paused"),
            "ContainersStopped": len(states) - states.count("running") - states.count("paused"),
            "Images": len(images),
            "Driver": info.get("Driver", ""),
            "DriverStatus": [],
            "Plugins": {
                "Volume": ["local"],
                "Network": ["bridge", "null"],
                "Authorization": None,
                "Log": ["local", "json-file"],
            },
            "MemoryLimit": info.get("MemoryLimit"),
            "SwapLimit": info.get("SwapLimit"),
            "CpuCfsPeriod": info.get("CpuCfsPeriod"),
            "CpuCfsQuota": info.get("CpuCfsQuota"),
            "CPUShares": info.get("CPUShares"),
            "CPUSet": info.get("CPUSet"),
            "PidsLimit": info.get("PidsLimit"),
            "OomKillDisable": info.get("OomKillDisable"),
            "IPv4Forwarding": info.get("IPv4Forwarding"),
            "Debug": False,
            "NFd": 0,
            "NGoroutines": 0,
            "SystemTime": info.get("SystemTime"),
            "LoggingDriver": "local",
            "CgroupDriver": info.get("CgroupDriver"),
            "CgroupVersion": info.get("CgroupVersion"),
            "NEventsListener": 0,
            "KernelVersion": info.get("KernelVersion"),
            "OperatingSystem": info.get("OperatingSystem"),
            "OSVersion": info.get("OSVersion"),
            "OSType": info.get("OSType"),
            "Architecture": info.get("Architecture"),
            "IndexServerAddress": info.get("IndexServerAddress"),
            "RegistryConfig": {"IndexConfigs": {}, "InsecureRegistryCIDRs": [], "Mirrors": []},
            "NCPU": info.get("NCPU"),
            "MemTotal": info.get("MemTotal"),
            "GenericResources": None,
            "DockerRootDir": "",
            "HttpProxy": "",
            "HttpsProxy": "",
            "NoProxy": "",
            "Labels": [],
            "ExperimentalBuild": False,
            "ServerVersion": info.get("ServerVersion"),
            "Runtimes": {"runc": {"path": "runc"}},
            "DefaultRuntime": "runc",
            "Swarm": {
                "NodeID": "",
                "NodeAddr": "",
                "LocalNodeState": "inactive",
                "ControlAvailable": False,
                "Error": "",
                "RemoteManagers": None,
            },
            "LiveRestoreEnabled": False,
            "Isolation": "",
            "InitBinary": "docker-init",
            "SecurityOptions": info.get("SecurityOptions") or [],
            "Warnings": None,
        }
        await side.respond_json(200, redacted)

    async def events_stream(self, side: ServerSide, request: Request) -> None:
        wanted = self._student_filters(request, {"type", "event", "label", "container", "image"})
        filters: dict[str, list[str]] = {"label": self._owner_labels()}
        for key in ("type", "event", "label"):
            if key in wanted:
                filters.setdefault(key, []).extend(wanted[key])
        if "container" in wanted:
            filters["container"] = [(await self.resolve_container(ref))["Id"] for ref in wanted["container"]]
        # The engine knows a student's images by other names than theirs: matched here, as the engine matches.
        images = set(wanted.get("image", []))
        image_ids = set()
        for ref in images:
            with contextlib.suppress(HttpError):
                image_ids.add((await self.resolve_image(ref)).id)
        query = {"filters": json.dumps(filters)}
        for key in ("since", "until"):
            if request.arg(key):
                query[key] = request.arg(key)
        stream = await self.engine.open("GET", "/events", query=query)

        def rewrite(line: bytes) -> bytes | None:
            return self._event_line(line, images=images, image_ids=image_ids)

        await self._stream_engine(side, stream, rewrite=LineRewriter(rewrite).feed)

    def _event_line(
        self, line: bytes, *, images: set[str] | None = None, image_ids: set[str] | None = None
    ) -> bytes | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if any(attributes.get(key) != value for key, value in self._owner().items()):
            return None
        if event.get("Type") == "container" and attributes.get(ROLE) != "student":
            return None
        if attributes.get(IMAGE_LABEL) and "image" in attributes:
            attributes["image"] = attributes[IMAGE_LABEL]
            if "from" in event:
                event["from"] = attributes[IMAGE_LABEL]
        if images:
            # docker events --filter image=: an image event's ID or name, a container event's image, each
            # also without its tag.
            name = self.namer.unmask(str(attributes.get("name" if event.get("Type") == "image" else "image", "")))
            untagged = name.rpartition(":")[0] if ":" in name.rpartition("/")[2] else name
            if str(event.get("id", "")) not in (image_ids or set()) and not {name, untagged} & images:
                return None
        event["Actor"]["Attributes"] = strip_labels(attributes)
        return self.namer.unmask(json.dumps(event)).encode() + b"\n"

    # Containers.

    async def container_list(self, side: ServerSide, request: Request) -> None:
        wanted = self._student_filters(
            request,
            {
                "status",
                "label",
                "id",
                "name",
                "exited",
                "ancestor",
                "before",
                "since",
                "volume",
                "health",
                "network",
                "publish",
                "expose",
                "is-task",
            },
        )
        names = wanted.pop("name", [])
        extra: dict[str, list[str]] = {}
        for key in ("status", "label", "id", "exited", "health", "expose"):
            if key in wanted:
                extra[key] = wanted[key]
        if "ancestor" in wanted:
            extra["ancestor"] = [(await self.resolve_image(ref)).id for ref in wanted["ancestor"]]
        for key in ("before", "since"):
            if key in wanted:
                extra[key] = [(await self.resolve_container(ref))["Id"] for ref in wanted[key]]
        if "volume" in wanted:
            extra["volume"] = [self.namer.volume(v) if "/" not in v else v for v in wanted["volume"]]
        if "network" in wanted:
            # Only the student's own containers are listed whatever the network, so any name can be asked for.
            extra["network"] = [self.network if v in ("bridge", "default") else v for v in wanted["network"]]
        published = [policy.port_filter(v) for v in wanted.get("publish", [])]
        query = {"filters": self._containers_filter(extra)}
        if request.flag("all"):
            query["all"] = "1"
        if request.flag("size"):
            query["size"] = "1"
        containers = await self.engine.json("GET", "/containers/json", query=query) or []
        moved = await self._moved_images(containers)
        views = [self._container_view(c, image_moved=c["Id"] in moved) for c in containers]
        if names:
            # As docker does, each name is tried with its leading slash and without.
            patterns = policy.name_patterns(names)
            views = [
                v
                for v in views
                if any(p.search(n) or p.search(n.lstrip("/")) for p in patterns for n in v["Names"])
            ]
        if published:
            # The engine publishes none of the students' ports; their forwarders do, while the container runs.
            views = [
                v
                for v in views
                if v.get("State") == "running"
                and any(
                    port.get("PublicPort") and match(int(port["PublicPort"]), str(port.get("Type")))
                    for port in v.get("Ports") or []
                    for match in published
                )
            ]
        limit = request.arg("limit")
        if re.fullmatch(r"[0-9]{1,9}", limit) and int(limit) > 0:
            views = views[: int(limit)]
        await side.respond(200, self.namer.unmask(json.dumps(views)).encode() + b"\n")

    async def _own_memory(self, containers: list[dict[str, Any]], *, exclude: str = "") -> int:
        details = await asyncio.gather(
            *(self.engine.json("GET", f"/containers/{c['Id']}/json") for c in containers if c["Id"] != exclude),
            return_exceptions=True,
        )
        total = 0
        for detail in details:
            if isinstance(detail, dict):
                total += int((detail.get("HostConfig") or {}).get("Memory") or 0)
        return total

    async def container_create(self, side: ServerSide, request: Request) -> None:
        plan = policy.container_create_plan(body=request.json(), limits=self.limits, network=self.network)
        name = request.arg("name")
        engine_name = self.namer.container(name) if name else ""
        await self._refuse_over_disk()
        async with self.budget_lock:
            image, containers = await asyncio.gather(self.resolve_image(plan.image), self.own_containers())
            if name:
                name = name.lstrip("/")
            else:
                name, engine_name = self._random_name(containers)
            response = await self._create_within_budget(
                plan, name=name, engine_name=engine_name, image=image, containers=containers
            )
        await self._respond_engine(side, response)

    async def _create_within_budget(
        self,
        plan: policy.CreatePlan,
        *,
        name: str,
        engine_name: str,
        image: ImageView,
        containers: list[dict[str, Any]],
    ) -> Response:
        # A container carries its image's labels too.
        inherited = image.entry.get("Labels") or {}
        policy.refuse_large_labels(policy.labels_size({**inherited, **plan.config["Labels"]}))
        detail = await self.engine.json("GET", f"/images/{image.id}/json")
        anonymous = set((detail.get("Config") or {}).get("Volumes") or {}) | set(plan.config.get("Volumes") or {})
        if len(anonymous) + len(plan.volumes) + len(plan.mounts) > policy.MAX_CONTAINER_VOLUMES:
            raise policy.Refused(
                f"a container in the sandbox may have at most {policy.MAX_CONTAINER_VOLUMES} volumes (its image's "
                "included)"
            )
        if len(containers) >= self.record.max_containers:
            raise policy.Refused(
                f"your sandbox may hold at most {self.record.max_containers} containers; remove some with "
                "docker rm (docker ps -a lists them)"
            )
        used = await self._own_memory(containers) + self.build_memory
        budget = self.record.memory_budget_mb * MB
        if used + plan.memory > budget:
            raise policy.Refused(
                f"your sandbox's containers may use {budget // MB} MB of memory in total and "
                f"{used // MB} MB are taken; remove a container or ask for less with --memory"
            )
        binds = []
        for source, target, mode in plan.volumes:
            volume = await self._ensure_volume(source)
            binds.append(f"{volume}:{target}" + (f":{mode}" if mode else ""))
        mounts = []
        for mount in plan.mounts:
            if mount["Source"]:
                mount["Source"] = await self._ensure_volume(mount["Source"])
            mounts.append(mount)
        config = dict(plan.config)
        config["Image"] = self._engine_image_ref(image, plan.image)
        labels = {**config.pop("Labels"), **self._labels("student"), IMAGE_LABEL: plan.image}
        # Always set, if only to nothing: a committed image carries its container's labels, and a container
        # made from it must not inherit the ports its ancestor published.
        labels[PORTS_LABEL] = policy.ports_label(plan.ports)
        if plan.ports:
            exposed = dict(config.get("ExposedPorts") or {})
            for port in plan.ports:
                exposed.setdefault(port.key, {})
            config["ExposedPorts"] = exposed
        config["Labels"] = labels
        host_config = dict(plan.host_config)
        if binds:
            host_config["Binds"] = binds
        if mounts:
            host_config["Mounts"] = mounts
        config["HostConfig"] = host_config
        if not plan.network_none:
            aliases = list(dict.fromkeys([name, *plan.aliases]))
            config["NetworkingConfig"] = {"EndpointsConfig": {self.network: {"Aliases": aliases}}}
        return await self.engine.call("POST", "/containers/create", query={"name": engine_name}, payload=config)

    def _engine_image_ref(self, image: ImageView, typed: str) -> str:
        """How to name the image to the engine so that what the engine prints reads as the student typed it."""
        try:
            ref = parse_reference(typed)
        except BadReference:
            return image.id
        if ref.digest:
            return image.id
        if ref.familiar in image.curated_tags:
            return typed
        if self.namer.image_tag(ref) in (image.entry.get("RepoTags") or []):
            repo = self.namer.image_repo(ref)
            return repo if split_repo_tag(typed)[1] == "" else f"{repo}:{ref.tag}"
        return image.id

    def _random_name(self, containers: list[dict[str, Any]]) -> tuple[str, str]:
        taken = {n for c in containers for n in c.get("Names", [])}
        for _ in range(20):
            name = f"{secrets.choice(ADJECTIVES)}_{secrets.choice(SURNAMES)}"
            engine_name = self.namer.container(name)
            if "/" + engine_name not in taken:
                return name, engine_name
        name = f"{secrets.choice(ADJECTIVES)}_{secrets.choice(SURNAMES)}{secrets.randbelow(10)}"
        return name, self.namer.container(name)

    async def _refuse_more_volumes(self) -> None:
        """A volume is a directory on the engine's disk that outlives its containers; the engine lists them all
        for every student's docker volume ls."""
        result = await self.engine.json("GET", "/volumes", query={"filters": self._own_filter()})
        if len(result.get("Volumes") or []) >= MAX_VOLUMES:
            raise policy.Refused(
                f"your sandbox may hold at most {MAX_VOLUMES} volumes; remove some with docker volume rm "
                "(docker volume ls lists them)"
            )

    async def _ensure_volume(self, name: str) -> str:
        engine_name = self.namer.volume(name)
        response = await self.engine.call("GET", f"/volumes/{q(engine_name)}")
        if response.status == 200:
            return engine_name
        await self._refuse_more_volumes()
        await self.engine.json(
            "POST",
            "/volumes/create",
            payload={"Name": engine_name, "Driver": "local", "Labels": self._labels("student-volume")},
        )
        return engine_name

    async def container_inspect(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        detail = await self.engine.json(
            "GET", f"/containers/{container['Id']}/json", query={"size": "1"} if request.flag("size") else None
        )
        hide_host_paths(detail)
        labels = (detail.get("Config") or {}).get("Labels") or {}
        detail["Name"] = self.namer.plain(detail.get("Name", ""))
        if labels.get(IMAGE_LABEL):
            detail["Config"]["Image"] = labels[IMAGE_LABEL]
        ports = policy.parse_ports_label(labels.get(PORTS_LABEL, ""))
        if ports:
            bindings: dict[str, list[dict[str, str]]] = {}
            for p in ports:
                bindings.setdefault(p.key, []).append({"HostIp": p.host_ip, "HostPort": str(p.host_port)})
            detail["HostConfig"]["PortBindings"] = bindings
            if (detail.get("State") or {}).get("Running"):
                settings_ports = detail.setdefault("NetworkSettings", {}).get("Ports") or {}
                for key in bindings:
                    settings_ports[key] = []
                for p in ports:
                    settings_ports[p.key] += [{"HostIp": a, "HostPort": str(p.host_port)} for a in p.addresses]
                detail["NetworkSettings"]["Ports"] = settings_ports
        self._as_default_network(detail)
        detail["Config"]["Labels"] = strip_labels(labels)
        await side.respond(200, self.namer.unmask(json.dumps(detail)).encode() + b"\n")

    async def _container_passthrough(
        self,
        side: ServerSide,
        request: Request,
        ref: str,
        suffix: str,
        keep: tuple[str, ...],
        method: str = "GET",
        *,
        lines: "LineRewriter | None" = None,
    ) -> None:
        container = await self.resolve_container(ref)
        query = [(k, v) for k, v in request.query if k in keep]
        stream = await self.engine.open(method, f"/containers/{container['Id']}{suffix}", query=query)
        if lines is None:
            await self._stream_engine(side, stream)
        else:
            await self._stream_engine(side, stream, rewrite=lines.feed, finish=lines.flush)

    async def container_logs(self, side: ServerSide, request: Request, ref: str) -> None:
        keep = ("follow", "stdout", "stderr", "since", "until", "timestamps", "tail", "details")
        await self._container_passthrough(side, request, ref, "/logs", keep)

    async def container_top(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        ps_args = request.arg("ps_args")
        query = [("ps_args", policy.top_args(ps_args))] if ps_args else []
        stream = await self.engine.open("GET", f"/containers/{container['Id']}/top", query=query)
        await self._stream_engine(side, stream)

    async def container_changes(self, side: ServerSide, request: Request, ref: str) -> None:
        await self._container_passthrough(side, request, ref, "/changes", ())

    async def container_path_stat(self, side: ServerSide, request: Request, ref: str) -> None:
        """docker cp asks what a path in the container is before it copies. The copy is not available; this
        answer lets the CLI go on to say so, where it would otherwise guess that a directory is missing."""
        container = await self.resolve_container(ref)
        response = await self.engine.call(
            "HEAD", f"/containers/{container['Id']}/archive", query={"path": request.arg("path")}
        )
        stat = response.headers.get("x-docker-container-path-stat")
        await side.respond(response.status, b"", headers=[("X-Docker-Container-Path-Stat", stat)] if stat else [])

    async def container_stats(self, side: ServerSide, request: Request, ref: str) -> None:
        names = LineRewriter(lambda line: self.namer.unmask(line.decode()).encode() + b"\n")
        await self._container_passthrough(side, request, ref, "/stats", ("stream", "one-shot"), lines=names)

    async def container_wait(self, side: ServerSide, request: Request, ref: str) -> None:
        await self._container_passthrough(side, request, ref, "/wait", ("condition",), method="POST")

    async def container_action(self, side: ServerSide, request: Request, ref: str, action: str) -> None:
        try:
            container = await self.resolve_container(ref)
        except HttpError as error:
            if action == "kill" and error.status == 404:
                raise HttpError(404, f"Cannot kill container: {ref}: {error.message}") from None
            raise
        if action in ("start", "restart", "unpause"):
            try:
                await self._refuse_over_disk()
            except policy.Refused:
                # `docker run --rm` waits for the container it made to be removed when its start fails.
                if action == "start":
                    await self._remove_if_auto(container["Id"])
                raise
        keep = {"stop": ("t",), "restart": ("t",), "kill": ("signal",), "start": ("detachKeys",)}.get(action, ())
        query = [(k, v) for k, v in request.query if k in keep]
        path = f"/containers/{container['Id']}/{action}"
        if self.ports is not None and publishes(container) and action != "pause":
            # Checked and started under the session's lock, and forwarded (or not) before docker hears back,
            # so that `docker run -d -p 8080:80 ...; curl localhost:8080` works as on the student's machine.
            async with self.ports.lock(self.record.session_id):
                if action in ("start", "restart"):
                    try:
                        await self.ports.check_start(self.record, container, self.namer)
                    except HttpError:
                        await self._remove_if_auto(container["Id"])
                        raise
                response = await self.engine.call("POST", path, query=query)
                if response.status < 300:
                    await self._sync_ports()
                    if action in ("start", "restart"):
                        try:
                            self.ports.check_started(self.record, container, self.namer)
                        except HttpError:
                            await self._undo_start(container["Id"])
                            raise
        else:
            response = await self.engine.call("POST", path, query=query)
        if response.status == 404:
            raise not_found_container(ref)
        named_as_typed(response, container["Id"], ref)
        await self._respond_engine(side, response)

    async def _undo_start(self, container_id: str) -> None:
        """With the session's port lock held: stop a container whose start is refused after the fact, and take
        its forwarder away again. A --rm container is then removed by the engine, as the CLI expects."""
        await self.engine.call("POST", f"/containers/{container_id}/kill")
        try:
            async with asyncio.timeout(10):
                await self.engine.call(
                    "POST", f"/containers/{container_id}/wait", query={"condition": "not-running"}
                )
        except TimeoutError:
            log.warning("session %s: %s did not stop after a refused start", self.record.session_id, container_id)
        await self._sync_ports()

    async def _remove_if_auto(self, container_id: str) -> None:
        """A --rm container that cannot start is removed, as the engine removes it (the CLI waits for that)."""
        detail = await self.engine.json("GET", f"/containers/{container_id}/json")
        if (detail.get("HostConfig") or {}).get("AutoRemove"):
            await self.engine.call("DELETE", f"/containers/{container_id}", query={"force": "1", "v": "1"})

    async def _sync_ports(self) -> None:
        """With the session's port lock held."""
        assert self.ports is not None
        try:
            await self.ports.sync_locked(self.record)
        except Exception:
            log.warning("session %s: could not sync published ports", self.record.session_id, exc_info=True)
            self.ports.request_sync(self.record)

    async def container_resize(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        query = [(k, v) for k, v in request.query if k in ("h", "w")]
        await self._respond_engine(
            side, await self.engine.call("POST", f"/containers/{container['Id']}/resize", query=query)
        )

    async def container_rename(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        new_name = self.namer.container(request.arg("name"))
        response = await self.engine.call(
            "POST", f"/containers/{container['Id']}/rename", query={"name": new_name}
        )
        await self._respond_engine(side, response)

    async def container_update(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        plan = policy.container_update_plan(body=request.json(), limits=self.limits)
        async with self.budget_lock:
            if plan.memory is not None:
                used = await self._own_memory(await self.own_containers(), exclude=container["Id"])
                used += self.build_memory
                budget = self.record.memory_budget_mb * MB
                if used + plan.memory > budget:
                    raise policy.Refused(
                        f"your sandbox's containers may use {budget // MB} MB of memory in total; "
                        f"the others already use {used // MB} MB"
                    )
            response = await self.engine.call("POST", f"/containers/{container['Id']}/update", payload=plan.body)
        await self._respond_engine(side, response)

    async def container_remove(self, side: ServerSide, request: Request, ref: str) -> None:
        if request.flag("link"):
            raise policy.not_available("docker rm --link")
        container = await self.resolve_container(ref)
        query = {"v": "1", "force": "1" if request.flag("force") else "0"}
        path = f"/containers/{container['Id']}"
        if self.ports is not None and publishes(container):
            async with self.ports.lock(self.record.session_id):
                response = await self.engine.call("DELETE", path, query=query)
                if response.status < 300:
                    await self._sync_ports()
        else:
            response = await self.engine.call("DELETE", path, query=query)
        if response.status == 404:
            raise not_found_container(ref)
        await self._respond_engine(side, response)

    async def container_prune(self, side: ServerSide, request: Request) -> None:
        wanted = self._student_filters(request, {"until", "label"})
        filters = json.loads(self._containers_filter(wanted))
        # The engine's prune keeps the containers' anonymous volumes, as docker rm without -v does; they
        # carry no label, so nothing could find them again. They go with their containers, as every removal
        # through the gateway takes them (the student never sees anonymous volumes).
        # All of them, not only the stopped: one that stops meanwhile may be pruned too.
        containers = await self.own_containers()
        anonymous = {
            c["Id"]: [
                str(m["Name"])
                for m in c.get("Mounts") or []
                if m.get("Type") == "volume" and ANONYMOUS_VOLUME_RE.fullmatch(str(m.get("Name", "")))
            ]
            for c in containers
        }
        response = await self.engine.call("POST", "/containers/prune", query={"filters": json.dumps(filters)})
        if response.status < 300:
            for container_id in (response.json() or {}).get("ContainersDeleted") or []:
                for volume in anonymous.get(container_id, []):
                    removed = await self.engine.call("DELETE", f"/volumes/{q(volume)}")
                    if removed.status >= 300 and removed.status != 404:
                        log.warning(
                            "session %s: could not remove volume %s: %s",
                            self.record.session_id,
                            volume,
                            removed.message,
                        )
        await self._respond_engine(side, response)

    async def container_attach(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        keep = ("stream", "stdin", "stdout", "stderr", "logs", "detachKeys")
        query = [(k, v) for k, v in request.query if k in keep]
        await self._hijack(side, request, f"/containers/{container['Id']}/attach", query=query, body=None)

    async def _hijack(
        self, side: ServerSide, request: Request, path: str, *, query: list[tuple[str, str]], body: bytes | None
    ) -> None:
        if not request.upgrade:
            raise HttpError(400, "this endpoint needs an upgraded connection (Connection: Upgrade, Upgrade: tcp)")
        headers = [("Connection", "Upgrade"), ("Upgrade", "tcp")]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        stream = await self.engine.open("POST", path, query=query, body=body, headers=headers)
        try:
            head = await stream.head()
            if head.status != 101:
                head.body = await stream.read_all(1024 * 1024)
                if head.status >= 400:
                    raise HttpError(head.status, self.namer.unmask(head.message))
                await side.respond(
                    head.status, head.body, content_type=head.headers.get("content-type", "text/plain")
                )
                return
            content_type = head.headers.get("content-type", "application/vnd.docker.raw-stream")
            from_student = await side.switch_protocols(
                [("Content-Type", content_type), ("Connection", "Upgrade"), ("Upgrade", "tcp")]
            )
            await splice(
                student=(side.reader, side.writer),
                engine=(stream.reader, stream.writer),
                student_first=from_student,
                engine_first=stream.trailing(),
            )
        finally:
            stream.close()

    # Exec.

    async def exec_create(self, side: ServerSide, request: Request, ref: str) -> None:
        container = await self.resolve_container(ref)
        body = policy.exec_create_body(request.json())
        detail = await self.engine.json("GET", f"/containers/{container['Id']}/json")
        # The engine lists the instances that have not finished (not started, or running).
        if len(detail.get("ExecIDs") or []) >= policy.MAX_PENDING_EXECS:
            raise policy.Refused(
                f"a container in the sandbox may have at most {policy.MAX_PENDING_EXECS} docker exec instances "
                "that have not finished; wait for some, or start those you made"
            )
        response = await self.engine.call("POST", f"/containers/{container['Id']}/exec", payload=body)
        named_as_typed(response, container["Id"], ref)
        await self._respond_engine(side, response)

    async def resolve_exec(self, ref: str) -> dict[str, Any]:
        if not re.fullmatch(r"[a-f0-9]{64}", ref):
            raise not_found_exec(ref)
        response = await self.engine.call("GET", f"/exec/{ref}/json")
        if response.status != 200:
            raise not_found_exec(ref)
        detail = response.json()
        owned = {c["Id"] for c in await self.own_containers()}
        if detail.get("ContainerID") not in owned:
            raise not_found_exec(ref)
        return dict(detail)

    async def exec_start(self, side: ServerSide, request: Request, ref: str) -> None:
        await self.resolve_exec(ref)
        body = policy.exec_start_body(request.json())
        if body["Detach"]:
            response = await self.engine.call("POST", f"/exec/{ref}/start", payload=body)
            await self._respond_engine(side, response)
            return
        await self._hijack(side, request, f"/exec/{ref}/start", query=[], body=json.dumps(body).encode())

    async def exec_resize(self, side: ServerSide, request: Request, ref: str) -> None:
        await self.resolve_exec(ref)
        query = [(k, v) for k, v in request.query if k in ("h", "w")]
        await self._respond_engine(side, await self.engine.call("POST", f"/exec/{ref}/resize", query=query))

    async def exec_inspect(self, side: ServerSide, request: Request, ref: str) -> None:
        detail = await self.resolve_exec(ref)
        await side.respond(200, self.namer.unmask(json.dumps(detail)).encode() + b"\n")

    # Images: ownership.

    async def image_views(
        self, *, all_images: bool = False, filters: dict[str, list[str]] | None = None
    ) -> list[ImageView]:
        if all_images or filters:
            query = {"all": "1" if all_images else "0"}
            if filters:
                query["filters"] = json.dumps(filters)
            entries = await self.engine.json("GET", "/images/json", query=query) or []
        else:
            entries = await self.engine_images.entries()
        views: list[ImageView] = []
        session = str(self.record.session_id)
        for entry in entries:
            labels = entry.get("Labels") or {}
            tags = [t for t in entry.get("RepoTags") or [] if t != "<none>:<none>"]
            own_tags = [t for t in tags if self.namer.owns_repo_tag(t)]
            # Only the name the catalog gave the image: an image built on the engine from a curated one
            # inherits its label, and whoever built it there did not mean it for every student. A catalog's
            # images serve every site on the engine, unless made for one site alone.
            curated_tags = [
                t
                for t in tags
                if t == labels.get(CATALOG)
                and not is_student_repo_tag(t)
                and labels.get(NAMESPACE, self.config.namespace) == self.config.namespace
            ]
            own = (
                labels.get(SESSION) == session
                and labels.get(NAMESPACE) == self.config.namespace
                and not curated_tags
            )
            if own or own_tags or curated_tags:
                views.append(ImageView(entry=entry, own=own, curated_tags=curated_tags, own_tags=own_tags))
        if all_images and not filters:
            views = self._with_layers(entries, views)
        return views

    @staticmethod
    def _with_layers(entries: list[dict[str, Any]], views: list[ImageView]) -> list[ImageView]:
        """The images below those a student sees: the steps of their builds and of the curated images, which
        docker images -a lists and docker run takes by ID. None is the student's to remove (each has a child,
        so the engine refuses), and each holds only what an image they see was built on."""
        parents = {str(e["Id"]): str(e.get("ParentId") or "") for e in entries}
        seen = {view.id for view in views}
        below: set[str] = set()
        for view in views:
            parent = parents.get(view.id, "")
            while parent and parent not in below and parent in parents:
                below.add(parent)
                parent = parents[parent]
        by_id = {view.id: view for view in views}
        return [
            by_id[image_id] if image_id in by_id else ImageView(entry=e, own=False, curated_tags=[], own_tags=[])
            for e in entries
            if (image_id := str(e["Id"])) in seen or image_id in below
        ]

    async def resolve_image(self, ref: str) -> ImageView:
        return (await self._resolve_image_among(ref))[1]

    async def _resolve_image_among(self, ref: str) -> tuple[list[ImageView], ImageView]:
        """The image a reference names, and the images it was looked for among."""
        views = await self.image_views()
        try:
            return views, self._find_image(views, ref)
        except HttpError:
            if not HEX_RE.match(ref):
                raise
        # An ID may name a step below the images listed (one that docker history shows).
        views = await self.image_views(all_images=True)
        return views, self._find_image(views, ref)

    def _find_image(self, views: list[ImageView], ref: str) -> ImageView:
        parsed: Reference | None = None
        try:
            parsed = parse_reference(ref)
        except BadReference:
            parsed = None
        if parsed is not None and not parsed.digest:
            familiar = parsed.familiar
            for view in views:
                if familiar in view.curated_tags:
                    return view
            engine_tag = self.namer.image_tag(parsed)
            for view in views:
                if engine_tag in view.own_tags:
                    return view
        if HEX_RE.match(ref):
            bare = ref.removeprefix("sha256:")
            matches = [v for v in views if image_id_matches(v.id, bare)]
            if len(matches) == 1 and (len(bare) >= 1):
                return matches[0]
        if parsed is not None:
            raise not_found_image(parsed.familiar if not parsed.digest else ref)
        raise not_found_image(ref)

    def _find_build_image(self, views: list[ImageView], ref: str) -> ImageView:
        """An image a Dockerfile names. The engine pulls a name it does not have (a short hex string may be
        one), and looks up only a full ID: here, a name that is not found cannot be pulled."""
        try:
            return self._find_image(views, ref)
        except HttpError:
            if ref.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{64}", ref):
                raise
            try:
                parsed = parse_reference(ref)
            except BadReference:
                raise not_found_image(ref) from None
            raise not_pullable(parsed.familiar_name) from None

    def _visible_tags(self, view: ImageView) -> list[str]:
        return view.curated_tags + [self.namer.unmask(t) for t in view.own_tags]

    def _image_entry(self, view: ImageView) -> dict[str, Any]:
        entry = dict(view.entry)
        tags = self._visible_tags(view)
        entry["RepoTags"] = tags or ([] if view.entry.get("RepoTags") in (None, []) else ["<none>:<none>"])
        digests = [d for d in entry.get("RepoDigests") or [] if not is_student_repo_tag(d)] if view.curated else []
        entry["RepoDigests"] = digests or ([] if tags else ["<none>@<none>"])
        entry["Labels"] = strip_labels(entry.get("Labels"))
        return entry

    # Images.

    async def image_list(self, side: ServerSide, request: Request) -> None:
        wanted = self._student_filters(request, {"dangling", "label", "before", "since", "reference"})
        references = wanted.pop("reference", [])
        engine_filters = {k: v for k, v in wanted.items() if k in ("dangling", "label")}
        for key in ("before", "since"):
            if key in wanted:
                engine_filters[key] = [(await self.resolve_image(ref)).id for ref in wanted[key]]
        views = await self.image_views(all_images=request.flag("all"), filters=engine_filters or None)
        entries = [self._image_entry(view) for view in views]
        if references:
            # As docker does: an image is listed with only the names that match, or not at all.
            def matches(tag: str) -> bool:
                repo, _tag = split_repo_tag(tag)
                return any(fnmatch.fnmatchcase(tag, r) or fnmatch.fnmatchcase(repo, r) for r in references)

            filtered = []
            for entry in entries:
                tags = [t for t in entry["RepoTags"] if t != "<none>:<none>" and matches(t)]
                if tags:
                    filtered.append({**entry, "RepoTags": tags})
            entries = filtered
        await side.respond_json(200, entries)

    async def image_inspect(self, side: ServerSide, request: Request, ref: str) -> None:
        view = await self.resolve_image(ref)
        detail = hide_host_paths(await self.engine.json("GET", f"/images/{view.id}/json"))
        detail["RepoTags"] = self._visible_tags(view)
        detail["RepoDigests"] = (
            [d for d in detail.get("RepoDigests") or [] if not is_student_repo_tag(d)] if view.curated else []
        )
        for key in ("Config", "ContainerConfig"):
            if isinstance(detail.get(key), dict):
                detail[key]["Labels"] = strip_labels(detail[key].get("Labels")) or None
        if not view.own and isinstance(detail.get("Metadata"), dict):
            # The engine's time of the image's last tag, whoever tagged it: every student tags the curated images.
            detail["Metadata"]["LastTagTime"] = detail.get("Created", "")
        await side.respond(200, self.namer.unmask(json.dumps(detail)).encode() + b"\n")

    async def image_history(self, side: ServerSide, request: Request, ref: str) -> None:
        view = await self.resolve_image(ref)
        views = await self.image_views(all_images=True)
        visible = {v.id: self._visible_tags(v) for v in views}
        history = await self.engine.json("GET", f"/images/{view.id}/history")
        rows: list[dict[str, Any]] = []
        # The gateway's own labels are the newest rows of a build (the session's, then the namespace's) or of
        # the build an image was made from; the first row shown stands for the image itself.
        top: dict[str, Any] | None = None
        below_session = False
        for row in history:
            created_by = str(row.get("CreatedBy", ""))
            nop = "#(nop)" in created_by
            if nop and f"LABEL {SESSION}=" in created_by:
                top = top or row
                below_session = True
                continue
            if nop and below_session and f"LABEL {NAMESPACE}=" in created_by:
                below_session = False
                continue
            below_session = False
            if not rows and top is not None:
                row["Id"] = top["Id"]
            row["Tags"] = visible.get(row.get("Id", "")) or None
            rows.append(row)
        await side.respond(200, self.namer.unmask(json.dumps(rows)).encode() + b"\n")

    def _student_target(self, repo: str, tag: str) -> tuple[Reference, str]:
        """The engine name for a name the student gives to an image; curated names are refused."""
        if not repo:
            raise HttpError(400, "repository name must have at least one component")
        ref = parse_reference(f"{repo}:{tag}" if tag else repo)
        if ref.digest:
            raise HttpError(400, "refusing to create a tag with a digest reference")
        return ref, self.namer.image_tag(ref)

    async def _refuse_curated_name(self, ref: Reference, views: list[ImageView] | None = None) -> None:
        views = views if views is not None else await self.image_views()
        curated = {t for v in views for t in v.curated_tags}
        curated_repos = {split_repo_tag(t)[0] for t in curated}
        if ref.familiar in curated or (
            not ref.domain and ref.familiar_name in curated_repos and ref.tag == "latest"
        ):
            raise policy.Refused(
                f"{ref.familiar} is one of the course's curated images and cannot be overwritten; "
                "choose another name"
            )

    def _refuse_more_images(
        self, views: list[ImageView], *, tags: list[str], new_image: bool, labels: int = 0
    ) -> None:
        """Every student's every command reads the engine's whole list of images: one student's thousands of
        names (a tag costs the engine nothing) or megabytes of labels would slow it for all, and past its size
        fail it for all. `labels` is the size of the new image's labels."""
        own_tags = {tag for view in views for tag in view.own_tags}
        if len(own_tags | set(tags)) > MAX_IMAGE_TAGS:
            raise policy.Refused(
                f"your sandbox may give its images at most {MAX_IMAGE_TAGS} names; remove some with "
                "docker image rm (docker images lists them)"
            )
        if new_image and sum(1 for view in views if view.own or view.own_tags) >= MAX_IMAGES:
            raise policy.Refused(
                f"your sandbox may hold at most {MAX_IMAGES} images; remove some with docker image rm or "
                "docker image prune (docker images -a lists them)"
            )
        if new_image:
            policy.refuse_large_labels(labels)
            held = sum(policy.labels_size(view.entry.get("Labels")) for view in views if view.own)
            if held + labels > policy.SANDBOX_LABELS_MAX:
                raise policy.Refused(
                    f"your sandbox's images may carry at most {policy.SANDBOX_LABELS_MAX // 1024} KB of labels in "
                    "all; remove some with docker image rm or docker image prune"
                )

    async def _image_shape(self, image_id: str) -> tuple[int, int]:
        """The length of an image's history, and the bytes of its configuration and history."""
        shape = IMAGE_SHAPES.get(image_id)
        if shape is None:
            detail, history = await asyncio.gather(
                self.engine.call("GET", f"/images/{q(image_id)}/json"),
                self.engine.call("GET", f"/images/{q(image_id)}/history"),
            )
            if detail.status != 200 or history.status != 200:
                return (0, 0)
            shape = (len(history.json() or []), len(detail.body) + len(history.body))
            if len(IMAGE_SHAPES) >= IMAGE_SHAPES_MAX:
                IMAGE_SHAPES.clear()
            IMAGE_SHAPES[image_id] = shape
        return shape

    async def _refuse_heavy_image(
        self, views: list[ImageView], *, bases: list[str], steps: int, added: int
    ) -> None:
        """Refuse a new image of `steps` steps on the images `bases`, each adding at most `added` bytes to the
        configuration, should it weigh too much, or the sandbox's images with it."""
        shapes = [await self._image_shape(base) for base in bases]
        rows = max((r for r, _ in shapes), default=0)
        size = max((b for _, b in shapes), default=0)
        weight = (rows + steps) * (size + added)
        if weight > IMAGE_WEIGHT_MAX:
            raise policy.Refused(
                f"an image in the sandbox may weigh at most {IMAGE_WEIGHT_MAX // MB} MB, counted as its steps "
                f"times the size of its configuration (this one would weigh {weight // MB} MB): write a shorter "
                "Dockerfile, or smaller ENV and LABEL values"
            )
        # One at a time (each measured once), so that a request holds few connections to the engine.
        held = 0
        for view in views:
            if view.own:
                own_rows, own_size = await self._image_shape(view.id)
                held += own_rows * own_size
        if held + weight > SANDBOX_WEIGHT_MAX:
            raise policy.Refused(
                f"your sandbox's images may weigh at most {SANDBOX_WEIGHT_MAX // MB} MB in all, counted as their "
                "steps times the size of their configuration; remove some with docker image rm or docker image "
                "prune"
            )

    async def image_tag(self, side: ServerSide, request: Request, ref: str) -> None:
        views, source = await self._resolve_image_among(ref)
        target, engine_tag = self._student_target(request.arg("repo"), request.arg("tag"))
        await self._refuse_curated_name(target, views)
        self._refuse_more_images(views, tags=[engine_tag], new_image=False)
        repo, tag = split_repo_tag(engine_tag)
        response = await self.engine.call("POST", f"/images/{source.id}/tag", query={"repo": repo, "tag": tag})
        await self._respond_engine(side, response)
        if response.status < 300:
            await self.events.publish(
                self.record.session_id, "image.tagged", id=source.id, tag=target.familiar, source=ref
            )

    async def image_remove(self, side: ServerSide, request: Request, ref: str) -> None:
        view = await self.resolve_image(ref)
        by_name = None
        try:
            parsed = parse_reference(ref)
            if not parsed.digest and self.namer.image_tag(parsed) in view.own_tags:
                by_name = self.namer.image_tag(parsed)
            elif not parsed.digest and parsed.familiar in view.curated_tags:
                raise HttpError(
                    409,
                    f'conflict: unable to remove repository reference "{ref}": {parsed.familiar} is one of the '
                    "course's curated images and cannot be removed",
                )
        except BadReference:
            pass
        if by_name is None:
            if view.curated:
                raise HttpError(
                    409,
                    f"conflict: unable to delete {short_id(view.id)}: it is one of the course's curated images "
                    "and cannot be removed",
                )
            if not view.own and view.own_tags:
                by_name = view.own_tags[0] if len(view.own_tags) == 1 else None
                if by_name is None:
                    raise HttpError(
                        409,
                        f"conflict: unable to delete {short_id(view.id)} (must be forced) - image is referenced "
                        "in multiple repositories",
                    )
        target = by_name or view.id
        if by_name and split_repo_tag(ref)[1] == "":
            # Named as the student named it, so that the engine's messages echo what they typed.
            target = by_name.rpartition(":")[0]
        # Forced by name only for an image of the student's own: untagging the last name of another image
        # (a curated one they tagged, say) must not delete it from under other students' containers.
        forced = request.flag("force") and (by_name is None or view.own)
        query = {
            "force": "1" if forced else "0",
            # Never --no-prune: the untagged steps it would keep carry no label of the student's, so that no list
            # of theirs, no cleanup and no disk budget would find them again.
            "noprune": "0",
        }
        response = await self.engine.call("DELETE", f"/images/{q(target)}", query=query)
        await self._respond_engine(side, response)
        if response.status < 300:
            items = response.json() or []
            await self.events.publish(
                self.record.session_id,
                "image.removed",
                ref=ref,
                untagged=[self.namer.unmask(i["Untagged"]) for i in items if "Untagged" in i],
                deleted=[i["Deleted"] for i in items if "Deleted" in i],
            )

    async def image_prune(self, side: ServerSide, request: Request) -> None:
        wanted = self._student_filters(request, {"dangling", "until", "label"})
        filters = {"label": self._owner_labels(), **{k: v for k, v in wanted.items() if k != "label"}}
        filters["label"].extend(wanted.get("label", []))
        response = await self.engine.call("POST", "/images/prune", query={"filters": json.dumps(filters)})
        await self._respond_engine(side, response)

    async def image_pull(self, side: ServerSide, request: Request) -> None:
        if request.arg("fromSrc"):
            raise policy.not_available("docker import")
        from_image = request.arg("fromImage")
        tag = request.arg("tag")
        if not from_image:
            raise HttpError(400, "fromImage is required")
        ref = parse_reference(
            f"{from_image}@{tag}" if tag.startswith("sha256:") else (f"{from_image}:{tag}" if tag else from_image)
        )
        if ref.domain:
            raise policy.Refused(
                f"pulling from {ref.domain} is not available in the Layercake sandbox: there is no registry here, "
                "only the course's curated images can be pulled",
            )
        views = await self.image_views()
        found = next((v for v in views if ref.familiar in v.curated_tags), None)
        if found is None:
            raise not_pullable(ref.familiar_name)
        path = ref.path if "/" in ref.path else f"library/{ref.path}"
        # A registry's digest names the image's manifest, not its ID: an image built here has none to show.
        digests = [d.split("@", 1)[1] for d in found.entry.get("RepoDigests") or [] if "@" in d]
        messages = [
            {"status": f"Pulling from {path}", "id": ref.tag},
            *([{"status": f"Digest: {digests[0]}"}] if digests else []),
            {"status": f"Status: Image is up to date for {ref.familiar}"},
        ]
        await side.start_stream(200, [("Content-Type", "application/json")])
        for message in messages:
            await side.stream_data(json.dumps(message).encode() + b"\r\n")
        await side.end_stream()

    async def commit(self, side: ServerSide, request: Request) -> None:
        container = await self.resolve_container(request.arg("container"))
        await self._refuse_over_disk()
        await self._refuse_commit_over_disk(str(container["Id"]))
        if not policy.is_zero(request.json()):
            raise policy.not_available("a configuration body for docker commit (use --change)")
        changes = policy.commit_changes(request.args("changes"))
        labels = policy.labels_size(container.get("Labels")) + policy.changes_label_size(changes)
        changes.append("LABEL " + " ".join(self._owner_labels()))
        query: list[tuple[str, str]] = [("container", container["Id"])]
        target: Reference | None = None
        views = await self.image_views()
        engine_tags = []
        if request.arg("repo"):
            target, engine_tag = self._student_target(request.arg("repo"), request.arg("tag"))
            await self._refuse_curated_name(target, views)
            repo, tag = split_repo_tag(engine_tag)
            query += [("repo", repo), ("tag", tag)]
            engine_tags.append(engine_tag)
        self._refuse_more_images(views, tags=engine_tags, new_image=True, labels=labels)
        # The image's configuration is the container's, twice (as run, and as it was made), and its history is
        # the container's image's with one more step.
        detail = await self.engine.json("GET", f"/containers/{container['Id']}/json")
        added = 2 * len(json.dumps(detail.get("Config"))) + sum(len(change) for change in changes)
        added += len(request.arg("comment")) + len(request.arg("author"))
        added += 2 * policy.changes_growth(changes, detail.get("Config") or {})
        await self._refuse_heavy_image(views, bases=[str(detail.get("Image", ""))], steps=1, added=added)
        for key in ("comment", "author"):
            if request.arg(key):
                query.append((key, request.arg(key)))
        query.append(("pause", "0" if request.arg("pause") in ("0", "false") else "1"))
        query += [("changes", change) for change in changes]
        response = await self.engine.call("POST", "/commit", query=query)
        await self._respond_engine(side, response)
        if response.status < 300:
            await self.events.publish(
                self.record.session_id,
                "image.committed",
                id=response.json().get("Id"),
                container=self.namer.plain(container["Names"][0]).lstrip("/"),
                tags=[target.familiar] if target else [],
            )

    # Builds.

    async def build(self, side: ServerSide, request: Request) -> None:
        # The images a build's steps make are nobody's to list (no session's label, or the builder's own on their
        # way to the image), and it names its image at its end: the shared list is forgotten as the build begins
        # and once it has ended (what a failed one leaves removed), and kept meanwhile. Kept as a change under way,
        # it was kept for no session for as long as a student's build ran.
        self.engine_images.forget()
        try:
            await self._build(side, request)
        finally:
            self.engine_images.forget()

    async def _build(self, side: ServerSide, request: Request) -> None:
        if request.arg("remote"):
            raise policy.not_available("building from a remote context (URL or git repository)")
        if request.arg("version") == "2":
            raise policy.not_available("BuildKit (use the classic builder: DOCKER_BUILDKIT=0)")
        if request.arg("networkmode") not in ("", "default", "none"):
            raise policy.not_available(f"docker build --network {request.arg('networkmode')}")
        for name, what in (
            ("extrahosts", "--add-host"),
            ("cgroupparent", "--cgroup-parent"),
            ("cpusetcpus", "--cpuset-cpus"),
            ("cpusetmems", "--cpuset-mems"),
            ("ulimits", "--ulimit"),
            ("securityopt", "--security-opt"),
            ("isolation", "--isolation"),
            ("squash", "--squash"),
            ("outputs", "--output"),
        ):
            value = request.arg(name)
            if value not in ("", "0", "false", "null", "[]", "{}", "default"):
                raise policy.not_available(f"docker build {what}")
        await self._refuse_over_disk()
        views = await self.image_views()
        tags = []
        targets = []
        for tag in request.args("t"):
            target, engine_tag = self._student_target(*split_repo_tag(tag))
            await self._refuse_curated_name(target, views)
            tags.append(engine_tag)
            targets.append(target.familiar)
        labels = policy.student_labels(json_arg(request, "labels"), "labels")
        labels.update(self._owner())
        build_args = json_arg(request, "buildargs")
        if build_args is not None and (
            not isinstance(build_args, dict) or not all(isinstance(v, str | None) for v in build_args.values())
        ):
            raise HttpError(400, "invalid build args")
        context = await asyncio.to_thread(
            policy.build_context_dockerfile,
            request.body,
            request.arg("dockerfile"),
            limit=self.config.build_context_max,
        )
        plan = policy.dockerfile_plan(context.dockerfile_text)
        await asyncio.to_thread(policy.refuse_added_archives, plan.dockerfile.instructions, context.tar)
        resolved: dict[str, str] = {}
        inherited = 0
        for position, image in [*plan.images.items(), *plan.copy_from.items()]:
            view = self._find_build_image(views, image)
            resolved[image] = self._engine_image_ref(view, image)
            if position in plan.images:
                inherited = max(inherited, policy.labels_size(view.entry.get("Labels")))
        self._refuse_more_images(
            views, tags=tags, new_image=True, labels=inherited + plan.label_bytes + policy.labels_size(labels)
        )
        # Each step's image holds what the Dockerfile says up to it in its configuration (as run and as made) and
        # history; a RUN step's history names the build arguments too.
        runs = sum(1 for instruction in plan.dockerfile.instructions if instruction.word == "RUN")
        added = 3 * len(context.dockerfile_text.encode()) + runs * len(request.arg("buildargs"))
        added += len(json.dumps(labels))
        bases = [self._find_image(views, image).id for image in plan.images.values()]
        configs = [(await self.engine.json("GET", f"/images/{base}/json")).get("Config") or {} for base in bases]
        growth = policy.configuration_growth(
            plan.dockerfile.instructions,
            bases=configs,
            outside=len(request.arg("buildargs")),
            build_args={k: v for k, v in (build_args or {}).items() if isinstance(v, str)},
            stage_bases=dict(zip(plan.images, configs, strict=True)),
        )
        added += 3 * growth
        await self._refuse_heavy_image(
            views, bases=bases, steps=len(plan.dockerfile.instructions) + len(labels), added=added
        )
        text = policy.dockerfile_rewrite(plan, lambda image: resolved[image])
        body = await asyncio.to_thread(
            policy.build_context_replace, context.tar, member_name=context.member_name, text=text
        )
        memory = await self._reserve_build_memory()
        try:
            query: list[tuple[str, str]] = [("t", t) for t in tags]
            query += [
                ("dockerfile", context.dockerfile_name),
                ("networkmode", "none"),
                ("rm", "1"),
                ("forcerm", "1"),
                ("pull", "0"),
                ("memory", str(memory)),
                ("memswap", str(memory)),
                ("cpuperiod", "100000"),
                ("cpuquota", str(self.limits.nano_cpus // 10_000)),
                ("labels", json.dumps(labels)),
                ("version", "1"),
            ]
            # Never quiet to the engine: it would keep all of the progress in its memory, and name no step's
            # container (the gateway shows what `docker build -q` shows).
            for key in ("target", "buildargs"):
                if request.arg(key):
                    query.append((key, request.arg(key)))
            cache = self._build_cache(views, request)
            query += cache
            sources = json.loads(dict(cache).get("cachefrom", "[]"))
            # What each cache source stands on, which the engine may change (see `_remove_unparented`).
            parents = {view.id: str(view.entry.get("ParentId") or "") for view in views if view.id in sources}
            started = time.time()
            stream = await self.engine.open(
                "POST", "/build", query=query, body=body, headers=[("Content-Type", "application/x-tar")]
            )
            # The context is the engine's now: nothing here keeps it (as sent, expanded or rewritten), and its slot
            # is free for another build.
            del body, context
            request.body = b""
            request.body_sent()
            output = BuildOutput(self.namer, hidden_steps=len(self._owner()), quiet=request.flag("q"))
            # Read on for a while should the student go (docker build interrupted), so that what the build leaves
            # when it fails, or is stopped then, is known and removed.
            completed = False

            def finish() -> bytes:
                # The engine has named the image: the student's next command, which may come as soon as the answer
                # ends, looks it up afresh.
                self.engine_images.forget()
                return output.flush()

            try:
                await self._stream_engine(
                    side,
                    stream,
                    rewrite=output.feed,
                    finish=finish,
                    each=lambda: self._limit_steps(output, memory, started),
                    drain=BUILD_DRAIN_SECONDS,
                )
                completed = True
            finally:
                self.build_containers.difference_update(output.limited)
                self.build_images.subtract(output.claimed)
                self.build_images = +self.build_images
                # An answer cut short (the student went, the engine's stream broke) built nothing to keep: the
                # last image it named may be any stage's.
                await self._remove_leftovers(
                    output, bases, started=started, succeeded=completed and not output.failed
                )
                await self._remove_unparented(parents)
            if output.image_id and not output.failed:
                await self.events.publish(self.record.session_id, "image.built", id=output.image_id, tags=targets)
        finally:
            self.build_memory -= memory

    def _build_cache(self, views: list[ImageView], request: Request) -> list[tuple[str, str]]:
        """The steps a build may reuse. The builder's cache is the engine's, every student's: a step another
        student ran on the same image, with the same command, would be reused, telling this one it was run
        ("Using cache") and handing them what it made (a key, a date, whatever it read at random). Named cache
        sources limit it to steps in those images' own history (the curated images' steps below the student's
        own images included): the student's own images (a dangling one too, so that rebuilding after a change
        reuses the steps before it), or those of them the student names with --cache-from. A name that is not
        found, or names no image of the student's own, is passed over, as the engine passes over one it does not
        find. A source is also one the engine changes: a build whose steps read as a source's history, its last
        step included, has the engine make that build's image the source's parent, and a curated image is every
        student's. The engine reads only the first nocache it is sent, so the gateway sends its own alone: one
        of the student's first would turn the cache back on where no source is left."""
        named = json_arg(request, "cachefrom")
        if named is not None and not (isinstance(named, list) and all(isinstance(ref, str) for ref in named)):
            raise HttpError(400, "invalid cachefrom: a list of image names is expected")
        if request.flag("nocache"):
            return [("nocache", "1")]
        if named:
            sources = []
            for ref in named:
                try:
                    view = self._find_image(views, ref)
                except HttpError:
                    continue
                if view.own:
                    sources.append(view.id)
        else:
            sources = [view.id for view in views if view.own]
        if not sources:
            # No source at all is, to the engine, every image on it.
            return [("nocache", "1")]
        return [("cachefrom", json.dumps(list(dict.fromkeys(sources))))]

    async def _reserve_build_memory(self) -> int:
        """The memory a build's steps may use: what the sandbox's containers and other builds leave of its
        budget, at most a container's. It counts as used until the build ends."""
        async with self.budget_lock:
            used = await self._own_memory(await self.own_containers()) + self.build_memory
            memory = min(self.limits.container_memory_max, self.record.memory_budget_mb * MB - used)
            if memory < 6 * MB:
                raise policy.Refused(
                    f"your sandbox's containers and builds use its {self.record.memory_budget_mb} MB of memory "
                    "already; remove a container, or wait for a build, and build again"
                )
            self.build_memory += memory
            return memory

    async def _remove_leftovers(
        self, output: "BuildOutput", bases: list[str], *, started: float, succeeded: bool
    ) -> None:
        """The images a build leaves that no one can name (the engine labels only the last stage's last), each
        holding everything before it, which the engine would keep on its disk, read by every student's docker
        images -a: the last of each stage before the last, which the engine names as it names the image built
        (so that the image is known only once the build has succeeded), and the last step of a build that
        failed. Each goes, and with it the steps below it that no other image or container uses. A RUN step may
        print what the builder prints, so only an untagged image that is no other sandbox's and that the engine
        made since the build began is removed."""
        built = output.image_id if succeeded else ""
        # A stage that only names an image (FROM, and no step) ends in that image, which is not the build's.
        leftovers = [image for image in output.stage_images if image != built and image not in bases]
        if not built:
            steps = [
                image
                for image in output.step_images
                if not any(base.startswith(f"sha256:{image}") for base in bases)
            ]
            leftovers += steps[-1:]
        if not leftovers:
            return
        try:
            if not built:
                # A build stopped midway removes its step's container after the answer ends: it must be gone first.
                deadline = time.monotonic() + 15
                while output.last_container and time.monotonic() < deadline:
                    if (await self.engine.call("GET", f"/containers/{output.last_container}/json")).status == 404:
                        break
                    await asyncio.sleep(0.2)
            for ref in dict.fromkeys(leftovers):
                detail = await self.engine.call("GET", f"/images/{q(ref)}/json")
                if detail.status != 200:
                    continue
                image = detail.json()
                session = ((image.get("Config") or {}).get("Labels") or {}).get(SESSION)
                if image.get("RepoTags") or session not in (None, str(self.record.session_id)):
                    continue
                if not made_since(image, started):
                    continue
                removed = await self.engine.call("DELETE", f"/images/{image['Id']}", query={"force": "0"})
                if removed.status >= 300 and removed.status != 409:
                    log.warning(
                        "session %s: could not remove what a build left: %s",
                        self.record.session_id,
                        removed.message,
                    )
        except HttpError:
            log.warning("session %s: could not remove what a build left", self.record.session_id, exc_info=True)

    async def _remove_unparented(self, parents: dict[str, str]) -> None:
        """A build whose steps read as a cache source's history has the engine make the build's image that
        source's parent (see `_build_cache`): the steps the source stood on before are left under no image,
        untagged, holding their layers, and no one's to see or remove. They go, from the one the source stood on
        down to the first that is tagged, curated, labelled as a student's image, or that another image or a
        container still uses (which the engine, asked to remove it alone, refuses)."""
        for source, before in parents.items():
            if not before:
                continue
            try:
                detail = await self.engine.call("GET", f"/images/{source}/json")
                if detail.status != 200 or str(detail.json().get("Parent") or "") == before:
                    continue
                entries = {
                    str(e["Id"]): e for e in await self.engine.json("GET", "/images/json", query={"all": "1"})
                }
                curated = curated_images(entries.values())
                children = Counter(str(e.get("ParentId") or "") for e in entries.values())
                node = before
                while node in entries and node not in curated and not children[node]:
                    entry = entries[node]
                    tags = [t for t in entry.get("RepoTags") or [] if t != "<none>:<none>"]
                    if tags or SESSION in (entry.get("Labels") or {}):
                        break
                    removed = await self.engine.call("DELETE", f"/images/{node}", query={"noprune": "1"})
                    if removed.status >= 300:
                        break
                    node = str(entry.get("ParentId") or "")
                    children[node] -= 1
            except HttpError:
                log.warning(
                    "session %s: could not remove the steps a build left under no image",
                    self.record.session_id,
                    exc_info=True,
                )

    async def _limit_steps(self, output: "BuildOutput", memory: int, started: float) -> None:
        """The builder cannot limit the processes of a step's container, which runs whatever the student wrote:
        each gets the limit of the student's containers as soon as the builder names it (before it starts it,
        or a moment after). Only a container the builder made since the build began, with this gateway's
        settings for builds, is changed (and counted as the sandbox's), since a RUN step may print the same
        words as the builder."""
        # Each step's image takes the sandbox's disk until the build's image holds it (or it is removed).
        # A RUN step may print what the builder prints: only an image the engine made since the build began is
        # counted as the build's.
        for image in set(output.step_images) - output.claimed - output.passed:
            detail = await self.engine.call("GET", f"/images/{q(image)}/json")
            made = detail.json() if detail.status == 200 else {}
            if str(made.get("Id", "")).removeprefix("sha256:").startswith(image) and made_since(made, started):
                output.claimed.add(image)
                self.build_images[image] += 1
            else:
                output.passed.add(image)
        while output.step_containers:
            ref = output.step_containers.pop(0)
            response = await self.engine.call("GET", f"/containers/{ref}/json")
            if response.status != 200:
                continue
            detail = response.json()
            host = detail.get("HostConfig") or {}
            if not (
                host.get("NetworkMode") == "none"
                and host.get("Memory") == memory
                and host.get("CpuPeriod") == 100000
                and host.get("CpuQuota") == self.limits.nano_cpus // 10_000
                and str(detail.get("Id", "")).startswith(ref)
                and made_since(detail, started)
            ):
                continue
            # The step's files take the sandbox's disk, which the disk watch measures.
            output.limited.append(detail["Id"])
            self.build_containers.add(detail["Id"])
            updated = await self.engine.call(
                "POST", f"/containers/{detail['Id']}/update", payload={"PidsLimit": self.limits.pids}
            )
            if updated.status >= 300:
                # A step that is over is gone or going; one that runs unlimited is stopped, failing the build.
                killed = await self.engine.call("POST", f"/containers/{detail['Id']}/kill")
                if killed.status < 300:
                    log.warning(
                        "session %s: stopped build step %s, which could not be limited: %s",
                        self.record.session_id,
                        ref,
                        updated.message,
                    )

    # Volumes.

    async def volume_list(self, side: ServerSide, request: Request) -> None:
        wanted = self._student_filters(request, {"name", "dangling", "driver", "label"})
        names = wanted.pop("name", [])
        result = await self.engine.json("GET", "/volumes", query={"filters": self._own_filter(wanted)})
        volumes = [self._volume_view(v) for v in result.get("Volumes") or []]
        if names:
            volumes = [v for v in volumes if any(n in v["Name"] for n in names)]
        await side.respond(
            200, self.namer.unmask(json.dumps({"Volumes": volumes, "Warnings": None})).encode() + b"\n"
        )

    def _volume_view(self, volume: dict[str, Any]) -> dict[str, Any]:
        volume["Labels"] = strip_labels(volume.get("Labels")) or None
        return hide_host_paths(volume)

    async def _own_volume(self, name: str) -> dict[str, Any]:
        try:
            engine_name = self.namer.volume(name)
        except BadReference:
            raise not_found_volume(name) from None
        response = await self.engine.call("GET", f"/volumes/{q(engine_name)}")
        if response.status != 200:
            raise not_found_volume(name)
        volume = response.json()
        labels = volume.get("Labels") or {}
        if labels.get(SESSION) != str(self.record.session_id) or labels.get(NAMESPACE) != self.config.namespace:
            raise not_found_volume(name)
        return dict(volume)

    async def volume_create(self, side: ServerSide, request: Request) -> None:
        name, labels = policy.volume_create_body(request.json())
        name = name or secrets.token_hex(32)
        engine_name = self.namer.volume(name)
        await self._refuse_over_disk()
        payload = {"Name": engine_name, "Driver": "local", "Labels": {**labels, **self._labels("student-volume")}}
        async with self.budget_lock:
            if (await self.engine.call("GET", f"/volumes/{q(engine_name)}")).status != 200:
                await self._refuse_more_volumes()
            response = await self.engine.call("POST", "/volumes/create", payload=payload)
        if response.status >= 400:
            raise HttpError(response.status, self.namer.unmask(response.message))
        await side.respond(201, self.namer.unmask(json.dumps(self._volume_view(response.json()))).encode() + b"\n")

    async def volume_inspect(self, side: ServerSide, request: Request, ref: str) -> None:
        volume = await self._own_volume(ref)
        await side.respond(200, self.namer.unmask(json.dumps(self._volume_view(volume))).encode() + b"\n")

    async def volume_remove(self, side: ServerSide, request: Request, ref: str) -> None:
        volume = await self._own_volume(ref)
        query = {"force": "1" if request.flag("force") else "0"}
        response = await self.engine.call("DELETE", f"/volumes/{q(volume['Name'])}", query=query)
        await self._respond_engine(side, response)

    # Networks.

    async def network_list(self, side: ServerSide, request: Request) -> None:
        response = await self.engine.call("GET", f"/networks/{q(self.network)}")
        networks = [self._network_view(response.json())] if response.status == 200 else []
        await side.respond_json(200, networks)

    def _network_view(self, network: dict[str, Any]) -> dict[str, Any]:
        """The session's network with only the student's own containers on it (not the workstation's or the
        port forwarders' addresses), named as docker's default network is."""
        network["Name"] = "bridge"
        network["Labels"] = strip_labels(network.get("Labels"))
        containers = network.get("Containers") or {}
        network["Containers"] = {
            key: {**value, "Name": self.namer.plain(value["Name"])}
            for key, value in containers.items()
            if isinstance(value, dict) and self.namer.owns_plain(str(value.get("Name", "")))
        }
        return network

    async def network_inspect(self, side: ServerSide, request: Request, ref: str) -> None:
        response = await self.engine.call("GET", f"/networks/{q(self.network)}")
        if response.status != 200:
            raise not_found_network(ref)
        network = response.json()
        if ref not in ("bridge", network.get("Name"), network.get("Id")) and not (
            len(ref) >= 1 and re.fullmatch(r"[a-f0-9]+", ref) and network.get("Id", "").startswith(ref)
        ):
            raise not_found_network(ref)
        await side.respond(200, self.namer.unmask(json.dumps(self._network_view(network))).encode() + b"\n")


def named_as_typed(response: Response, container_id: str, ref: str) -> None:
    """The engine names a container in its refusals as it was asked for it; it was asked by ID."""
    if response.status >= 400 and response.body:
        message = response.message
        for before, after in (
            (f"container: {container_id}:", f"container: {ref}:"),
            (f"Container {container_id} is paused", f"Container {ref} is paused"),
        ):
            message = message.replace(before, after, 1)
        response.body = json.dumps({"message": message}).encode()


class LineRewriter:
    """Rewrites a newline-delimited JSON stream line by line, holding back only an incomplete last line."""

    def __init__(self, rewrite: Callable[[bytes], bytes | None]) -> None:
        self.rewrite = rewrite
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        self.pending += chunk
        lines = self.pending.split(b"\n")
        self.pending = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                rewritten = self.rewrite(line)
                if rewritten:
                    out.append(rewritten)
        return b"".join(out)

    def flush(self) -> bytes:
        pending, self.pending = self.pending, b""
        if pending.strip():
            return self.rewrite(pending) or b""
        return b""


STEP_RE = re.compile(r"^Step (\d+)/(\d+) : ")
ID_LINE_RE = re.compile(r"^ ---> [0-9a-f]{12}\n?$")
# The builder names each step's container before it starts it; a RUN step may print the same words.
RUNNING_RE = re.compile(r"^ ---> Running in ([0-9a-f]{12})\n?$")
# What `docker build -q` holds back of the progress, to show should the build fail (the engine keeps it all).
QUIET_HELD_MAX = 1024 * 1024


class BuildOutput(LineRewriter):
    """The classic builder's progress with the student's names, and without the steps that label the image
    as theirs (each label of the labels parameter becomes a LABEL step of its own, in the order of the keys;
    only the gateway's labels are in layercake's space)."""

    def __init__(self, namer: Namer, *, hidden_steps: int, quiet: bool = False) -> None:
        super().__init__(self._line)
        self.namer = namer
        self.hidden_steps = hidden_steps
        self.hidden = 0
        self.hiding = False
        # The image each stage ended in, as the engine names them: the last is the image built, once the build
        # has succeeded.
        self.stage_images: list[str] = []
        self.image_id = ""
        self.held = b""
        # The containers the builder says it runs steps in, as it says so (see `StudentGateway._limit_steps`).
        self.step_containers: list[str] = []
        # The IDs of the step containers the gateway limited, in full: the build's own.
        self.limited: list[str] = []
        # The step images the build's sandbox counts as its own while the build runs, and those it was told of
        # that the build did not make.
        self.claimed: set[str] = set()
        self.passed: set[str] = set()
        self.last_container = ""
        # The images the builder says its steps made (the first is the image a stage starts from).
        self.step_images: list[str] = []
        # As the engine answers `docker build -q`: only the image's ID, or everything once it fails.
        self.quiet = quiet
        self.failed = False
        self.quiet_held = b""

    def _line(self, line: bytes) -> bytes | None:
        try:
            message = json.loads(line)
        except ValueError:
            return line + b"\n"
        aux = message.get("aux")
        if isinstance(aux, dict) and aux.get("ID"):
            self.image_id = str(aux["ID"])
            self.stage_images.append(self.image_id)
        text = message.get("stream")
        running = RUNNING_RE.match(text) if isinstance(text, str) else None
        if running:
            self.step_containers.append(running.group(1))
            self.last_container = running.group(1)
        if isinstance(text, str) and ID_LINE_RE.match(text):
            self.step_images.append(text.strip().removeprefix("---> "))
        if message.get("error"):
            self.failed = True
        # A step's resulting ID is held until what follows shows whether the next step is shown.
        held, self.held = self.held, b""
        if isinstance(text, str):
            match = STEP_RE.match(text)
            if match:
                step, total = int(match.group(1)), int(match.group(2))
                if text[match.end() :].startswith(f"LABEL {policy.LABEL_SPACE}"):
                    self.hidden += 1
                    self.hiding = True
                    return None
                self.hiding = False
                text = f"Step {step - self.hidden}/{total - self.hidden_steps} : " + text[match.end() :]
            elif text.startswith("Successfully") or message.get("error"):
                self.hiding = False
            elif self.hiding:
                if ID_LINE_RE.match(text):
                    self.held = self._encode(message)
                return None
            message["stream"] = text
            if ID_LINE_RE.match(text):
                self.held = self._encode(message)
                return held or None
        elif self.hiding and not message.get("error") and not aux:
            return held or None
        if message.get("error"):
            self.hiding = False
        return held + self._encode(message)

    def _encode(self, message: dict[str, Any]) -> bytes:
        return self.namer.unmask(json.dumps(message)).encode() + b"\r\n"

    def feed(self, chunk: bytes) -> bytes:
        return self._quietly(super().feed(chunk))

    def flush(self) -> bytes:
        rest = super().flush()
        held, self.held = self.held, b""
        out = self._quietly(held + rest)
        if self.quiet and not self.failed and self.image_id:
            self.quiet_held = b""
            return out + self._encode({"stream": self.image_id + "\n"})
        return out

    def _quietly(self, out: bytes) -> bytes:
        if not self.quiet:
            return out
        held = self.quiet_held + out
        self.quiet_held = b""
        if self.failed:
            return held
        if len(held) > QUIET_HELD_MAX:
            cut = held.find(b"\n", len(held) - QUIET_HELD_MAX)
            held = held[cut + 1 :] if cut >= 0 else b""
        self.quiet_held = held
        return b""


async def until_closed(side: ServerSide) -> None:
    """Return once the student has closed their side of the connection; what they send meanwhile is kept for
    the next request, but past the size of a request's head they are taken for gone too."""
    kept = 0
    try:
        while kept <= MAX_HEADER_BYTES and (data := await side.reader.read(65536)):
            side.conn.receive_data(data)
            kept += len(data)
    except (ConnectionError, OSError):
        pass


async def splice(
    *,
    student: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    engine: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    student_first: bytes,
    engine_first: bytes,
) -> None:
    """Relay a hijacked stream both ways, unbuffered, passing on each side's half-close."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        try:
            if first:
                writer.write(first)
                await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    upstream = asyncio.create_task(pump(student[0], engine[1], student_first))
    downstream = asyncio.create_task(pump(engine[0], student[1], engine_first))
    try:
        await downstream
    finally:
        upstream.cancel()
        await asyncio.gather(upstream, return_exceptions=True)
        engine[1].close()


async def engine_error(exc: EngineError) -> HttpError:
    return HttpError(exc.status, exc.message)


def now() -> int:
    return int(time.time())


def made_since(image: dict[str, Any], moment: float) -> bool:
    """Whether the engine made an image (as it inspects it) at `moment` or later, a second's difference
    between the engine's clock and this one's allowed."""
    try:
        created = datetime.fromisoformat(str(image.get("Created", "")))
    except ValueError:
        return False
    return created.tzinfo is not None and created.timestamp() >= moment - 1
