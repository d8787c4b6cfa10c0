"""What each sandbox keeps on the engine's disk, and what the gateway does when one keeps more than it may.

The engine sets no quota on this storage driver (fuse-overlayfs takes no size option), so one student's `dd`
in a container, a volume or a build step could fill the disk that every student shares. The gateway measures
instead, every CHECK_SECONDS while it serves a session: one `docker system df` of the whole engine, which walks
every container's and volume's files and refuses a second while one runs (so the gateway alone asks, and a
student's own docker system df reads what it last found), and the engine's list of images.

A sandbox's share is the writable layers of its containers, its workstation and its builds' step containers;
its volumes (the anonymous ones its containers mount too); and the layers that only its own images hold (its
builds' step images while they run), each counted once: a curated image's layers are everyone's. Over its
budget, what of it is writing is killed (see `DiskWatch`), and nothing that takes more of the disk is made (a
container created, started or unpaused, a build, a commit, a volume) until the student has removed enough:
after a removal, such a command looks again first, so the one after `docker rm` goes through.
"""

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .engine import Engine
from .events import EventPublisher
from .http import HttpError
from .labels import CATALOG, NAMESPACE, RECIPE, ROLE, SESSION

log = logging.getLogger("layercake.gateway")

CHECK_SECONDS = 3.0
MB = 1024 * 1024
STUDENT_ROLES = ("student", "workstation")
# The workstation's files change as the student works (their shell's history, an editor's swap file): over the
# budget, it is stopped, ending the sandbox, only if it is what is filling the disk.
WORKSTATION_GROWTH_MAX = MB
# The engine walks every container's and volume's files for each look: however many students ask, at most a few
# looks a second.
LOOK_GAP_SECONDS = 0.5


@dataclass(frozen=True)
class DiskShare:
    """Bytes a sandbox keeps: in its containers' writable layers (its build steps' too), its workstation's, its
    own images' layers, its volumes."""

    layers: int = 0
    workstation: int = 0
    images: int = 0
    volumes: int = 0

    @property
    def total(self) -> int:
        return self.layers + self.workstation + self.images + self.volumes


class Sandbox(Protocol):
    """What the watch needs of a session's gateway."""

    # The containers and images of its builds' steps while they run (the builder labels neither as the
    # student's), the images by the 12 digits the builder prints.
    build_containers: set[str]
    build_images: Counter[str]
    disk_full: str | None

    @property
    def session_id(self) -> int: ...

    @property
    def disk_budget(self) -> int: ...


def _owner(labels: dict[str, str] | None, namespace: str) -> int | None:
    labels = labels or {}
    if labels.get(NAMESPACE) != namespace:
        return None
    try:
        return int(labels.get(SESSION, ""))
    except ValueError:
        return None


def curated_images(images: Iterable[dict[str, Any]]) -> set[str]:
    """The catalog's own images, everyone's, from GET /images/json?all=1: those tagged with the name their
    catalog label gives them, and those whose own last step set their recipe label, which stay the catalog's
    once it untags them for newer ones. An image built on a curated one inherits both labels, but not the tag,
    and its recipe label is its parent's."""
    entries = {str(e["Id"]): e for e in images}
    curated = set()
    for image_id, entry in entries.items():
        labels = entry.get("Labels") or {}
        if SESSION in labels:
            continue
        parent = entries.get(str(entry.get("ParentId") or ""))
        recipe = labels.get(RECIPE)
        if labels.get(CATALOG) in (entry.get("RepoTags") or []) or (
            recipe is not None and (parent is None or (parent.get("Labels") or {}).get(RECIPE) != recipe)
        ):
            curated.add(image_id)
    return curated


def image_shares(
    images: Iterable[dict[str, Any]],
    *,
    namespace: str,
    claimed: dict[str, int] | None = None,
    curated: set[str] | None = None,
) -> dict[int, int]:
    """Per session, the bytes of the layers that only its own images hold, from GET /images/json?all=1.

    Each image adds one layer to its parent's (its size less its parent's). An image someone can name (tagged),
    that is no other's parent, or that a catalog made holds its stack; a layer is a session's when every image
    that holds it is one of the session's own. `claimed` gives a session the steps of its builds under way, by
    their first 12 digits; `curated` names the catalog's images, which are no one's."""
    claimed = claimed or {}
    curated = curated or set()
    entries = {str(e["Id"]): e for e in images}
    parents = {image_id: str(e.get("ParentId") or "") for image_id, e in entries.items()}
    have_children = set(parents.values())
    holders: dict[str, set[int | None]] = {}
    for image_id, entry in entries.items():
        tags = [t for t in entry.get("RepoTags") or [] if t != "<none>:<none>"]
        short = image_id.removeprefix("sha256:")[:12]
        if tags or image_id not in have_children or image_id in curated or short in claimed:
            owner = None if image_id in curated else claimed.get(short, _owner(entry.get("Labels"), namespace))
            node, seen = image_id, set()
            while node in entries and node not in seen:
                seen.add(node)
                holders.setdefault(node, set()).add(owner)
                node = parents[node]
    shares: dict[int, int] = {}
    for node, owners in holders.items():
        if len(owners) != 1:
            continue
        (owner,) = owners
        if owner is None:
            continue
        size = int(entries[node].get("Size") or 0)
        parent = entries.get(parents[node])
        layer = max(size - int(parent.get("Size") or 0), 0) if parent else size
        shares[owner] = shares.get(owner, 0) + layer
    return shares


def _created_at(volume: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(volume.get("CreatedAt", ""))).timestamp()
    except ValueError:
        return 0.0


def is_workstation(container: dict[str, Any]) -> bool:
    return (container.get("Labels") or {}).get(ROLE) == "workstation"


def sandbox_containers(
    containers: Iterable[dict[str, Any]], sandbox: Sandbox, *, namespace: str
) -> list[dict[str, Any]]:
    """The containers of docker system df that take a sandbox's disk: the student's, their workstation, and its
    builds' steps (the builder gives those no label of the student's)."""
    mine = []
    for container in containers:
        labels = container.get("Labels") or {}
        students = _owner(labels, namespace) == sandbox.session_id and labels.get(ROLE) in STUDENT_ROLES
        if students or container.get("Id") in sandbox.build_containers:
            mine.append(container)
    return mine


def megabytes(size: int) -> str:
    return f"{size / MB:.1f}"


class DiskWatch:
    """Looks at what every sandbox keeps on the engine's disk, and acts for those over their budget.

    Each look sets each sandbox's `disk_full` (the message its refusals give, or None within the budget), kills
    what of a sandbox over its budget is writing (a container, a build step, a workstation past a megabyte
    more than it held when the sandbox went over), and publishes `disk.full` at every look while a sandbox is
    over (so that a page connecting late hears it too), `disk.freed` when it is back within (and at its first
    look, for a page told otherwise before the gateway restarted). What a sandbox held before the watch began
    on it (as a restarted gateway begins) counts as it was, not as grown."""

    def __init__(
        self,
        engine: Engine,
        *,
        namespace: str,
        events: EventPublisher | None = None,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self.engine = engine
        self.events = events
        self.namespace = namespace
        self.check_seconds = check_seconds
        self.sandboxes: dict[int, Sandbox] = {}
        self.lock = asyncio.Lock()
        self.measured_at = -math.inf
        # Something was removed since the last look: what it took may be free.
        self.stale = False
        self.volume_sizes: dict[str, int] = {}
        # Sizes at the last look, by container ID and by volume name: what grew since is what is writing.
        self.last_sizes: dict[str, int] = {}
        # When each sandbox was last looked at (or joined the watch), by the engine's clock: a container or
        # volume made since counts all it holds as grown; one made before, and not seen, as it was.
        self.since: dict[int, float] = {}
        # The sandboxes looked at once at least.
        self.looked: set[int] = set()
        # The sandboxes, over their budget, that had something stopped since they went over.
        self.stopped: set[int] = set()
        # What each sandbox's workstation held as the sandbox went over its budget.
        self.workstation_at_over: dict[int, int] = {}

    def join(self, sandbox: Sandbox) -> None:
        self.sandboxes[sandbox.session_id] = sandbox
        # The engine gives a container's making to the second: the second before counts as since.
        self.since.setdefault(sandbox.session_id, time.time() - 1)

    def leave(self, session_id: int) -> None:
        self.sandboxes.pop(session_id, None)
        self.since.pop(session_id, None)
        self.looked.discard(session_id)
        self.stopped.discard(session_id)
        self.workstation_at_over.pop(session_id, None)

    async def watch_forever(self) -> None:
        while True:
            if self.sandboxes:
                started = time.monotonic()
                try:
                    await self.measure()
                except Exception:
                    # The next look may do; the watch itself must not end.
                    log.warning("the engine's disk usage could not be measured", exc_info=True)
                took = time.monotonic() - started
                if took > self.check_seconds:
                    log.warning("a look at the engine's disk usage took %.1f s", took)
            await asyncio.sleep(self.check_seconds)

    def forget(self) -> None:
        self.stale = True

    async def refresh(self, *, max_age: float, removals: bool = True) -> None:
        """Measure again if the last look is older than max_age, or (with removals) if something was removed
        since; several asking at once wait for one."""
        async with self.lock:
            age = time.monotonic() - self.measured_at
            if (removals and self.stale) or age > max_age:
                await asyncio.sleep(max(LOOK_GAP_SECONDS - age, 0))
                await self._measure()

    async def measure(self) -> None:
        async with self.lock:
            await self._measure()

    async def _measure(self) -> None:
        measured_at = time.monotonic()
        # The engine gives a container's making to the second, and its clock may be a little off this one's.
        looked_at = time.time() - 1
        self.stale = False
        response = await self.engine.call("GET", "/system/df")
        if response.status != 200:
            # Someone else's docker system df on the engine: the next look will do.
            log.warning("the engine's disk usage is not known: %s", response.message)
            return
        usage = response.json() or {}
        images = await self.engine.json("GET", "/images/json", query={"all": "1"}) or []
        self.measured_at = measured_at
        volumes = {str(v.get("Name")): v for v in usage.get("Volumes") or []}
        self.volume_sizes = {name: int((v.get("UsageData") or {}).get("Size", -1)) for name, v in volumes.items()}
        containers = usage.get("Containers") or []
        claimed = {image: s.session_id for s in self.sandboxes.values() for image in +s.build_images}
        in_images = image_shares(images, namespace=self.namespace, claimed=claimed, curated=curated_images(images))
        sizes: dict[str, int] = {}
        for sandbox in list(self.sandboxes.values()):
            own = sandbox_containers(containers, sandbox, namespace=self.namespace)
            # Its own volumes, and the anonymous ones its containers mount (which go with their container).
            mounted = {m.get("Name") for c in own for m in c.get("Mounts") or [] if m.get("Type") == "volume"}
            own_volumes = {
                name: max(size, 0)
                for name, size in self.volume_sizes.items()
                if _owner(volumes[name].get("Labels"), self.namespace) == sandbox.session_id or name in mounted
            }
            written = {str(c["Id"]): max(int(c.get("SizeRw") or 0), 0) for c in own}
            in_workstation = sum(written[str(c["Id"])] for c in own if is_workstation(c))
            share = DiskShare(
                layers=sum(written.values()) - in_workstation,
                workstation=in_workstation,
                images=in_images.get(sandbox.session_id, 0),
                volumes=sum(own_volumes.values()),
            )
            since = self.since.get(sandbox.session_id, looked_at)
            before = {
                **{str(c["Id"]): 0 if int(c.get("Created") or 0) >= since else written[str(c["Id"])] for c in own},
                **{
                    f"volume:{name}": 0 if _created_at(volumes[name]) >= since else size
                    for name, size in own_volumes.items()
                },
                **self.last_sizes,
            }
            try:
                await self._judge(sandbox, share, own, own_volumes, written, before)
            finally:
                sizes.update(written)
                sizes.update({f"volume:{name}": size for name, size in own_volumes.items()})
                self.since[sandbox.session_id] = looked_at
                self.looked.add(sandbox.session_id)
        self.last_sizes = sizes

    def _writers(
        self,
        sandbox: Sandbox,
        containers: list[dict[str, Any]],
        volumes: dict[str, int],
        written: dict[str, int],
        before: dict[str, int],
    ) -> list[dict[str, Any]]:
        """What of a sandbox over its budget is writing: a container that grew since the last look (one made
        since counts from nothing), or that mounts a volume that did; the workstation once it holds a megabyte
        more than when the sandbox went over."""
        grown = {name for name, size in volumes.items() if size > before.get(f"volume:{name}", size)}
        writers = []
        for container in containers:
            if container.get("State") not in ("running", "restarting", "paused"):
                continue
            size = written[str(container["Id"])]
            if is_workstation(container):
                at_over = self.workstation_at_over.setdefault(sandbox.session_id, size)
                if size > at_over + WORKSTATION_GROWTH_MAX:
                    writers.append(container)
                continue
            mounts = {m.get("Name") for m in container.get("Mounts") or [] if m.get("Type") == "volume"}
            if size > before.get(str(container["Id"]), size) or mounts & grown:
                writers.append(container)
        return writers

    async def _judge(
        self,
        sandbox: Sandbox,
        share: DiskShare,
        containers: list[dict[str, Any]],
        volumes: dict[str, int],
        written: dict[str, int],
        before: dict[str, int],
    ) -> None:
        was_full = sandbox.disk_full is not None
        if share.total <= sandbox.disk_budget:
            sandbox.disk_full = None
            self.stopped.discard(sandbox.session_id)
            self.workstation_at_over.pop(sandbox.session_id, None)
            if was_full or sandbox.session_id not in self.looked:
                # A page that heard the sandbox was over before the gateway restarted hears it is not.
                await self._publish(sandbox, "disk.freed", share)
            return
        writers = self._writers(sandbox, containers, volumes, written, before)
        if writers:
            self.stopped.add(sandbox.session_id)
        sandbox.disk_full = self._message(sandbox, share)
        # Told before anything is stopped: the workstation's own terminal goes with it.
        await self._publish(sandbox, "disk.full", share)
        for container in writers:
            try:
                # A container killed is one stopped by hand: its restart policy does not start it again (nor
                # one between two restarts, nor a paused one).
                answer = await self.engine.call("POST", f"/containers/{container['Id']}/kill")
            except HttpError:
                log.warning("session %s: could not stop %s", sandbox.session_id, container["Id"], exc_info=True)
                continue
            if answer.status < 300:
                log.info(
                    "session %s: stopped container %s, which wrote past the sandbox's disk budget",
                    sandbox.session_id,
                    str(container["Id"])[:12],
                )
            else:
                log.warning(
                    "session %s: could not stop %s: %s", sandbox.session_id, container["Id"][:12], answer.message
                )

    def _message(self, sandbox: Sandbox, share: DiskShare) -> str:
        parts = [f"{megabytes(share.layers)} MB in its containers"]
        if share.workstation:
            parts.append(f"{megabytes(share.workstation)} MB in the files of its workstation (your shell)")
        parts += [f"{megabytes(share.images)} MB in its images", f"{megabytes(share.volumes)} MB in its volumes"]
        return (
            f"your sandbox keeps {megabytes(share.total)} MB on the disk, more than the "
            f"{sandbox.disk_budget // MB} MB it may: {', '.join(parts[:-1])} and {parts[-1]}"
            + ("; what was writing was stopped" if sandbox.session_id in self.stopped else "")
            + ". Remove what you no longer need (docker rm, docker rmi, docker volume rm, or rm in your shell; "
            "docker system df lists your images, containers and volumes) and try again"
        )

    async def _publish(self, sandbox: Sandbox, kind: str, share: DiskShare) -> None:
        if self.events is None:
            return
        await self.events.publish(
            sandbox.session_id,
            kind,
            used=share.total,
            budget=sandbox.disk_budget,
            message=sandbox.disk_full or "",
        )
