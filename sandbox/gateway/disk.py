"""What each sandbox keeps on the engine's disk, and what the gateway does when one keeps more than it may.

The engine sets no quota on this storage driver (fuse-overlayfs takes no size option), so one student's `dd`
in a container, a volume or a build step could fill the disk that every student shares. The gateway measures
instead, every CHECK_SECONDS while it serves a session (see `DiskWatch` for what each look costs the engine).
The workstation is not measured: its root file system is read-only and its files are in its memory.

A sandbox's share is the writable layers of its containers and its builds' step containers; its volumes (the
anonymous ones its containers mount too); and the layers that only its own images hold (its builds' step
images while they run), each counted once: a curated image's layers are everyone's. Over its budget, what of
it is writing is killed, and nothing that takes more of the disk is made (a container created, started or
unpaused, a build, a commit, a volume) until the student has removed enough: after a removal, such a command
looks again first, so the one after `docker rm` goes through.
"""

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .engine import Engine, follow_events
from .events import EventPublisher
from .http import HttpError
from .labels import CATALOG, NAMESPACE, RECIPE, ROLE, SESSION

log = logging.getLogger("layercake.gateway")

CHECK_SECONDS = 3.0
# docker system df, the only size of a volume the engine gives, walks every container on the engine: at most
# this often, and only while a volume may be changing.
VOLUME_SECONDS = 10.0
# A look that took long waits this many times as long before the next: the watch takes at most a quarter of
# the engine's time.
PACE = 3
MB = 1024 * 1024
# A stopped container, sized once, is sized again at least this often.
SETTLED_SECONDS = 60.0
# The states in which a container may write.
WRITING = ("running", "restarting", "paused")
# A look has the engine walk the files of what may have changed: however many students ask, at most a few looks
# a second.
LOOK_GAP_SECONDS = 0.5


@dataclass(frozen=True)
class DiskShare:
    """Bytes a sandbox keeps: in its containers' writable layers (its build steps' too), its own images'
    layers, its volumes."""

    layers: int = 0
    images: int = 0
    volumes: int = 0

    @property
    def total(self) -> int:
        return self.layers + self.images + self.volumes


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


def sandbox_containers(
    containers: Iterable[dict[str, Any]], sandbox: Sandbox, *, namespace: str
) -> list[dict[str, Any]]:
    """The containers that take a sandbox's disk: the student's, and its builds' steps (the builder gives
    those no label of the student's)."""
    mine = []
    for container in containers:
        labels = container.get("Labels") or {}
        students = _owner(labels, namespace) == sandbox.session_id and labels.get(ROLE) == "student"
        if students or container.get("Id") in sandbox.build_containers:
            mine.append(container)
    return mine


def megabytes(size: int) -> str:
    return f"{size / MB:.1f}"


@dataclass
class Look:
    """What one look found on the engine: the students' containers and their builds' step containers, each
    with its writable layer's size (`SizeRw`), the volumes by name, the images."""

    containers: list[dict[str, Any]]
    volumes: dict[str, dict[str, Any]]
    images: list[dict[str, Any]]


class DiskWatch:
    """Looks at what every sandbox keeps on the engine's disk, and acts for those over their budget.

    Each look sets each sandbox's `disk_full` (the message its refusals give, or None within the budget), kills
    what of a sandbox over its budget is writing (a container or a build step that grew since the last look),
    and publishes `disk.full` at every look while a sandbox is over (so that a page connecting late hears it
    too), `disk.freed` when it is back within (and at its first look, for a page told otherwise before the
    gateway restarted). What a sandbox held before the watch began on it (as a restarted gateway begins)
    counts as it was, not as grown.

    The engine walks a container's files to size its writable layer (on fuse-overlayfs the whole tree, over a
    second for a Debian one), so a look sizes only what may have changed: the containers that run, and those
    that ran since they were last sized, which the engine's events tell (`follow`); without them, every
    container at every look. Volumes are sized only by docker system df, which walks every container on the
    engine as well: at most every VOLUME_SECONDS, and only while one is new or was mounted since the last
    (without events, while there are any). A look that takes long makes the watch wait PACE times as long
    before the next."""

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
        # The sizes of volumes and when each was made, as the last docker system df found them; when that
        # began and how long it took, and how long the one of the look under way took.
        self.volume_sizes: dict[str, int] = {}
        self.volume_made: dict[str, float] = {}
        self.volumes_at = -math.inf
        self.volumes_took = 0.0
        self.volumes_took_in_look = 0.0
        # The engine's events are followed (`follow`), and how many times they have been taken up or lost.
        self.following = False
        self.generation = 0
        # The writable layers of containers that have not run since they were sized, by ID: while the events
        # are followed, they cannot have changed. Started or restarted during a look, a container is not
        # settled by what the look found. Each is sized again within SETTLED_SECONDS all the same: the engine
        # drops events for a subscriber it finds slow, without a word.
        self.settled: dict[str, tuple[int, float]] = {}
        self.started: set[str] = set()
        # When each volume was last known to be mounted (by the events, or by a look that found a container
        # that mounts it running or newly stopped): one not mounted since the last docker system df began
        # holds what that found. With no events, since when no volume's size is known to hold.
        self.volume_used: dict[str, float] = {}
        self.volumes_known_at = -math.inf
        # Sizes at the last look, by container ID and by volume name: what grew since is what is writing.
        self.last_sizes: dict[str, int] = {}
        # What each sandbox kept at the last look.
        self.shares: dict[int, DiskShare] = {}
        # When each sandbox was last looked at (or joined the watch), by the engine's clock: a container made
        # since counts all it holds as grown; one made before, and not seen, as it was. A volume's size may
        # not be known at every look: one made since the sandbox joined counts all it holds as grown until its
        # size is first known, one made before as it was.
        self.since: dict[int, float] = {}
        self.joined: dict[int, float] = {}
        # The sandboxes looked at once at least.
        self.looked: set[int] = set()
        # The sandboxes, over their budget, that had something stopped since they went over.
        self.stopped: set[int] = set()

    def join(self, sandbox: Sandbox) -> None:
        self.sandboxes[sandbox.session_id] = sandbox
        # The engine gives a container's making to the second: the second before counts as since.
        self.since.setdefault(sandbox.session_id, time.time() - 1)
        self.joined.setdefault(sandbox.session_id, self.since[sandbox.session_id])

    def leave(self, session_id: int) -> None:
        self.sandboxes.pop(session_id, None)
        self.since.pop(session_id, None)
        self.joined.pop(session_id, None)
        self.shares.pop(session_id, None)
        self.looked.discard(session_id)
        self.stopped.discard(session_id)

    async def watch_forever(self) -> None:
        while True:
            took = 0.0
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
                # A docker system df is paced apart: it does not hold back the looks at containers.
                took -= self.volumes_took_in_look
            await asyncio.sleep(max(self.check_seconds, PACE * took))

    async def follow(self) -> None:
        """Follow, for as long as the caller runs, the starts of students' containers (one that has not run
        since it was sized is not sized again) and the mounts of volumes (one that no container mounted since
        the last docker system df began is not sized again). A volume's events carry no labels: every
        volume's are heard, and a container's are told apart by its labels here."""
        filters = {"type": ["container", "volume"], "event": ["start", "mount", "unmount"]}
        await follow_events(self.engine, filters, connected=self._followed, event=self._heard, lost=self._lost)

    def _followed(self) -> None:
        # What ran while no events were heard is not known: every container and volume is sized again.
        self.generation += 1
        self.following = True
        self.settled.clear()
        self.volumes_known_at = -math.inf

    def _lost(self) -> None:
        self.generation += 1
        self.following = False
        self.settled.clear()
        self.volumes_known_at = -math.inf

    async def _heard(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            actor_id = str(event["Actor"]["ID"])
            attributes = event["Actor"].get("Attributes") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        if event.get("Type") == "volume":
            self.volume_used[actor_id] = time.monotonic()
        elif attributes.get(NAMESPACE) == self.namespace and attributes.get(ROLE) == "student":
            self.settled.pop(actor_id, None)
            self.started.add(actor_id)

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

    async def _look(self) -> Look:
        self.started.clear()
        self.volumes_took_in_look = 0.0
        following, generation = self.following, self.generation
        # As settled when the look began: a start heard meanwhile unsettles a container for the next look.
        settled, began = dict(self.settled), time.monotonic()
        namespace = f"{NAMESPACE}={self.namespace}"
        listed, images, labelled = await asyncio.gather(
            self.engine.json(
                "GET",
                "/containers/json",
                query={"all": "1", "filters": json.dumps({"label": [namespace, f"{ROLE}=student"]})},
            ),
            self.engine.json("GET", "/images/json", query={"all": "1"}),
            self.engine.json("GET", "/volumes", query={"filters": json.dumps({"label": [namespace]})}),
        )
        listed = listed or []
        steps = {container for sandbox in self.sandboxes.values() for container in sandbox.build_containers}
        unsized = {
            str(c["Id"])
            for c in listed
            if c.get("State") in WRITING
            or not following
            or str(c["Id"]) not in settled
            or settled[str(c["Id"])][1] < began - SETTLED_SECONDS
        }
        sized: dict[str, dict[str, Any]] = {}
        if unsized or steps:
            answer = await self.engine.json(
                "GET",
                "/containers/json",
                query={"all": "1", "size": "1", "filters": json.dumps({"id": sorted({*unsized, *steps})})},
            )
            sized = {str(c["Id"]): c for c in answer or []}
        if following and generation == self.generation:
            for container_id, container in sized.items():
                if container.get("State") not in WRITING and container_id not in self.started:
                    self.settled[container_id] = (int(container.get("SizeRw") or 0), began)
        present = {str(c["Id"]) for c in listed}
        self.settled = {key: value for key, value in self.settled.items() if key in present}
        # One to be sized that was gone by then holds nothing.
        containers = [
            sized.get(str(c["Id"])) or {**c, "SizeRw": 0 if str(c["Id"]) in unsized else settled[str(c["Id"])][0]}
            for c in listed
        ] + [sized[step] for step in steps if step in sized]
        return Look(
            containers=containers,
            volumes=await self._volumes(labelled, containers, sized, following=following),
            images=images or [],
        )

    async def _volumes(
        self,
        labelled: dict[str, Any] | None,
        containers: list[dict[str, Any]],
        sized: dict[str, dict[str, Any]],
        *,
        following: bool,
    ) -> dict[str, dict[str, Any]]:
        """The sandboxes' volumes by name (those labelled as theirs, and the anonymous ones their containers
        mount), each with its size (`Size`, None while not known) and when it was made (`Made`)."""
        volumes = {str(v["Name"]): v for v in (labelled or {}).get("Volumes") or []}
        now = time.monotonic()
        for container in containers:
            for mount in container.get("Mounts") or []:
                if mount.get("Type") != "volume":
                    continue
                name = str(mount.get("Name"))
                volumes.setdefault(name, {"Name": name})
                # Written to now, or until it stopped since the last look.
                if container.get("State") in WRITING or str(container.get("Id")) in sized:
                    self.volume_used[name] = now

        def known(name: str) -> bool:
            made = _created_at(volumes[name])
            # A volume made again under the same name is another volume.
            return name in self.volume_sizes and (not made or made == self.volume_made.get(name))

        changing = [
            name
            for name in volumes
            if not following or not known(name) or self.volume_used.get(name, -math.inf) >= self.volumes_known_at
        ]
        if changing and now - self.volumes_at >= max(VOLUME_SECONDS, PACE * self.volumes_took):
            await self._size_volumes()
        self.volume_used = {name: at for name, at in self.volume_used.items() if at >= self.volumes_known_at}
        for name, volume in volumes.items():
            volume["Size"] = self.volume_sizes[name] if known(name) else None
            volume["Made"] = _created_at(volume) or self.volume_made.get(name, 0.0)
        return volumes

    async def _size_volumes(self) -> None:
        started = time.monotonic()
        self.volumes_at = started
        response = await self.engine.call("GET", "/system/df")
        self.volumes_took = self.volumes_took_in_look = time.monotonic() - started
        if response.status != 200:
            # Someone else's docker system df on the engine: a later look will do.
            log.warning("the engine's volume sizes are not known: %s", response.message)
            return
        found = (response.json() or {}).get("Volumes") or []
        self.volume_sizes = {
            str(v.get("Name")): max(int((v.get("UsageData") or {}).get("Size", 0)), 0) for v in found
        }
        self.volume_made = {str(v.get("Name")): _created_at(v) for v in found}
        self.volumes_known_at = started

    async def _measure(self) -> None:
        measured_at = time.monotonic()
        # The engine gives a container's making to the second, and its clock may be a little off this one's.
        looked_at = time.time() - 1
        self.stale = False
        look = await self._look()
        self.measured_at = measured_at
        claimed = {image: s.session_id for s in self.sandboxes.values() for image in +s.build_images}
        in_images = image_shares(
            look.images, namespace=self.namespace, claimed=claimed, curated=curated_images(look.images)
        )
        sizes: dict[str, int] = {}
        for sandbox in list(self.sandboxes.values()):
            own = sandbox_containers(look.containers, sandbox, namespace=self.namespace)
            # Its own volumes, and the anonymous ones its containers mount (which go with their container).
            mounted = {m.get("Name") for c in own for m in c.get("Mounts") or [] if m.get("Type") == "volume"}
            own_volumes: dict[str, int | None] = {
                name: volume["Size"]
                for name, volume in look.volumes.items()
                if _owner(volume.get("Labels"), self.namespace) == sandbox.session_id or name in mounted
            }
            written = {str(c["Id"]): max(int(c.get("SizeRw") or 0), 0) for c in own}
            share = DiskShare(
                layers=sum(written.values()),
                images=in_images.get(sandbox.session_id, 0),
                volumes=sum(size or 0 for size in own_volumes.values()),
            )
            since = self.since.get(sandbox.session_id, looked_at)
            joined = self.joined.get(sandbox.session_id, looked_at)
            before = {
                **{str(c["Id"]): 0 if int(c.get("Created") or 0) >= since else written[str(c["Id"])] for c in own},
                **{
                    f"volume:{name}": 0 if look.volumes[name]["Made"] >= joined else size
                    for name, size in own_volumes.items()
                    if size is not None
                },
                **self.last_sizes,
            }
            self.shares[sandbox.session_id] = share
            try:
                await self._judge(sandbox, share, own, own_volumes, written, before)
            finally:
                sizes.update(written)
                sizes.update({f"volume:{name}": size for name, size in own_volumes.items() if size is not None})
                self.since[sandbox.session_id] = looked_at
                self.looked.add(sandbox.session_id)
        self.last_sizes = sizes

    def _writers(
        self,
        containers: list[dict[str, Any]],
        volumes: dict[str, int | None],
        written: dict[str, int],
        before: dict[str, int],
    ) -> list[dict[str, Any]]:
        """What of a sandbox over its budget is writing: a container that grew since the last look (one made
        since counts from nothing), or that mounts a volume that did."""
        grown = {
            name
            for name, size in volumes.items()
            if size is not None and size > before.get(f"volume:{name}", size)
        }
        writers = []
        for container in containers:
            if container.get("State") not in WRITING:
                continue
            size = written[str(container["Id"])]
            mounts = {m.get("Name") for m in container.get("Mounts") or [] if m.get("Type") == "volume"}
            if size > before.get(str(container["Id"]), size) or mounts & grown:
                writers.append(container)
        return writers

    async def _judge(
        self,
        sandbox: Sandbox,
        share: DiskShare,
        containers: list[dict[str, Any]],
        volumes: dict[str, int | None],
        written: dict[str, int],
        before: dict[str, int],
    ) -> None:
        was_full = sandbox.disk_full is not None
        if share.total <= sandbox.disk_budget:
            sandbox.disk_full = None
            self.stopped.discard(sandbox.session_id)
            if was_full or sandbox.session_id not in self.looked:
                # A page that heard the sandbox was over before the gateway restarted hears it is not.
                await self._publish(sandbox, "disk.freed", share)
            return
        writers = self._writers(containers, volumes, written, before)
        if writers:
            self.stopped.add(sandbox.session_id)
        sandbox.disk_full = self._message(sandbox, share)
        # Told before anything is stopped.
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
        parts += [f"{megabytes(share.images)} MB in its images", f"{megabytes(share.volumes)} MB in its volumes"]
        return (
            f"your sandbox keeps {megabytes(share.total)} MB on the disk, more than the "
            f"{sandbox.disk_budget // MB} MB it may: {', '.join(parts[:-1])} and {parts[-1]}"
            + ("; what was writing was stopped" if sandbox.session_id in self.stopped else "")
            + ". Remove what you no longer need (docker rm, docker rmi, docker volume rm; "
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
