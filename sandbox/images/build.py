"""The curated images onto the engine: built offline from their recipes, or pulled where a registry is reachable.

`images_ensure` skips an image whose `layercake.recipe` label matches its recipe digest and builds (or pulls)
the others, one at a time, under a lock shared by every process on the host. It leaves behind no build
directory and no dangling image: what a failed build made is removed, and so is the image a build replaced,
unless a container or another image still uses it.

Images built on a curated image inherit its labels, `layercake.catalog` and `layercake.recipe` included; only
the reference and the recipe digest together identify the curated image itself.
"""

import collections
import dataclasses
import fcntl
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import docker.utils
import requests.exceptions
from django.conf import settings

from .catalog import CatalogEntry, catalog_entries, catalog_entry
from .errors import EngineUnreachable, ImageBuildError, RecipeFailed
from .recipe import RecipeFile, recipe_context, recipe_digest, recipe_files
from .rootfs import (
    build_dir_create,
    build_dir_remove,
    build_dirs_stale,
    debootstrap_command,
    mirror_check,
    rootfs_debootstrap,
    rootfs_prune,
    rootfs_tar,
)

log = logging.getLogger(__name__)

MANAGED = "layercake.managed"
CATALOG = "layercake.catalog"
RECIPE = "layercake.recipe"
SOURCES = ("build", "pull")
# Long enough for the engine to take in a few hundred megabytes of root file system in one request.
ENGINE_TIMEOUT = 900

Progress = Callable[[str], None]
Action = Literal["current", "built", "pulled"]
State = Literal["current", "stale", "missing", "present", "unknown"]

_ENGINE_FAILURES = (docker.errors.DockerException, requests.exceptions.RequestException)
_STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
_BUILDER_CHATTER = re.compile(r"^(?: ---> |Removing intermediate container |Successfully (?:built|tagged) )")


@dataclass(frozen=True)
class ImageResult:
    name: str
    action: Action
    image_id: str
    size: int
    seconds: float


@dataclass(frozen=True)
class ImageStatus:
    entry: CatalogEntry
    state: State
    image_id: str
    size: int
    detail: str


def image_source() -> str:
    source = getattr(settings, "SANDBOX_IMAGE_SOURCE", "build")
    if source not in SOURCES:
        raise ImageBuildError(f"SANDBOX_IMAGE_SOURCE must be one of {', '.join(SOURCES)}, not {source!r}")
    return str(source)


def images_ensure(*, names: list[str] | None = None, force: bool = False, progress: Progress) -> list[ImageResult]:
    """Make every named catalog image (all of them by default) present and current on the engine.

    Raises UnknownImage for a name not in the catalog, and an ImageBuildError (EngineUnreachable,
    ToolMissing, MirrorUnreachable, RecipeFailed) whose message says what to do; images done before the
    failure stay done.
    """
    source = image_source()
    entries = catalog_entries() if names is None else [catalog_entry(name) for name in names]
    entries = list({entry.name: entry for entry in entries}.values())
    client = _engine()
    try:
        with _build_lock(progress):
            for stale in build_dirs_stale(_build_root()):
                progress(f"removing {stale.name}, left behind by an interrupted build")
                _remove_build_dir(stale, progress)
            return [_ensure(client, entry, source=source, force=force, progress=progress) for entry in entries]
    finally:
        client.close()


def images_status() -> list[ImageStatus]:
    source = image_source()
    entries = catalog_entries()
    client = _engine()
    statuses = []
    try:
        for entry in entries:
            image = _inspect(client, entry.name)
            if image is None:
                statuses.append(ImageStatus(entry, "missing", "", 0, ""))
                continue
            state: State = "present"
            detail = ""
            if source == "build":
                try:
                    state = "current" if _labels(image).get(RECIPE) == recipe_digest(entry) else "stale"
                except ImageBuildError as exc:
                    state, detail = "unknown", str(exc)
            statuses.append(ImageStatus(entry, state, image["Id"], int(image.get("Size") or 0), detail))
    except _ENGINE_FAILURES as exc:
        raise ImageBuildError(f"the engine failed to list the images: {_explain(exc)}") from exc
    finally:
        client.close()
    return statuses


def _ensure(
    client: docker.DockerClient, entry: CatalogEntry, *, source: str, force: bool, progress: Progress
) -> ImageResult:
    started = time.monotonic()

    def say(text: str) -> None:
        progress(f"  {time.monotonic() - started:6.1f}s  {text}")

    try:
        if source == "pull":
            return _pull(client, entry, started=started, say=say, progress=progress)
        _sweep(client, entry, progress=progress)
        files = recipe_files(entry)
        digest = recipe_digest(entry, files)
        old = _inspect(client, entry.name)
        if old is not None and not force and _labels(old).get(RECIPE) == digest:
            progress(f"{entry.name}: current ({_short(old['Id'])}, recipe {digest[7:19]})")
            return ImageResult(entry.name, "current", old["Id"], int(old.get("Size") or 0), _since(started))
        reason = "not on the engine yet" if old is None else "forced" if force else "its recipe changed"
        progress(f"{entry.name}: building ({reason}; recipe {digest[7:19]})")
        made: list[str] = []
        try:
            base = _debootstrap_base(client, entry, made=made, say=say) if entry.kind == "debootstrap" else None
            image_id = _classic_build(
                client, entry, files=files, digest=digest, base=base, nocache=force, made=made, say=say
            )
        except BaseException:
            _discard(client, made[::-1])
            raise
        if old is not None:
            _retire(client, old["Id"], say=say)
        size = int(client.api.inspect_image(image_id).get("Size") or 0)
        say(f"built {entry.name} {_short(image_id)}, {_megabytes(size)}, in {_since(started):.1f} s")
        return ImageResult(entry.name, "built", image_id, size, _since(started))
    except _ENGINE_FAILURES as exc:
        raise ImageBuildError(f"{entry.name}: the engine failed: {_explain(exc)}") from exc


def _debootstrap_base(client: docker.DockerClient, entry: CatalogEntry, *, made: list[str], say: Progress) -> str:
    spec = entry.debootstrap
    assert spec is not None
    debootstrap = debootstrap_command()
    say(f"checking the mirror {spec.mirror} for {spec.suite}")
    mirror_check(mirror=spec.mirror, suite=spec.suite)
    workdir = build_dir_create(parent=_build_root(), name=_slug(entry.name))
    try:
        rootfs = workdir / "rootfs"
        say(f"debootstrap --variant=minbase {spec.suite}, adding {', '.join(spec.packages) or 'nothing'}")
        rootfs_debootstrap(
            debootstrap=debootstrap,
            target=rootfs,
            spec=spec,
            cache_dir=_data_dir() / "cache" / "debootstrap",
            progress=say,
        )
        files, size = rootfs_prune(root=rootfs, prune=spec.prune, keep=spec.keep)
        say(f"pruned {files} files, {_megabytes(size)}: apt lists and caches, documentation, logs")
        say("importing the root file system into the engine")
        base = _import(client, entry, rootfs)
        made.append(base)
        size = int(client.api.inspect_image(base).get("Size") or 0)
        say(f"imported the base {_short(base)}, {_megabytes(size)}")
        return base
    finally:
        _remove_build_dir(workdir, say)


def _import(client: docker.DockerClient, entry: CatalogEntry, rootfs: Path) -> str:
    changes = [f"LABEL {MANAGED}=1 {CATALOG}={json.dumps(entry.name)}"]
    with rootfs_tar(rootfs) as stream:
        answer = client.api.import_image_from_stream(stream, changes=changes)
    image_id = ""
    for line in str(answer).splitlines():
        message = json.loads(line) if line.strip() else {}
        if "error" in message:
            raise RecipeFailed(f"{entry.name}: the engine refused the root file system: {message['error']}")
        status = str(message.get("status", ""))
        if status.startswith("sha256:"):
            image_id = status
    if not image_id:
        raise RecipeFailed(f"{entry.name}: the engine imported the root file system but named no image: {answer}")
    return image_id


def _classic_build(
    client: docker.DockerClient,
    entry: CatalogEntry,
    *,
    files: list[RecipeFile],
    digest: str,
    base: str | None,
    nocache: bool,
    made: list[str],
    say: Progress,
) -> str:
    labels = {
        **entry.labels,
        "org.opencontainers.image.description": entry.purpose,
        MANAGED: "1",
        CATALOG: entry.name,
        RECIPE: digest,
    }
    dockerfile = f"recipes/{entry.recipe.name}/Dockerfile"
    say(f"classic build of {dockerfile}")
    recent: collections.deque[str] = collections.deque(maxlen=15)
    image_id = ""
    for chunk in client.api.build(
        fileobj=io.BytesIO(recipe_context(_labelled(files, labels))),
        custom_context=True,
        tag=entry.name,
        rm=True,
        forcerm=True,
        nocache=nocache,
        pull=False,
        buildargs={"BASE": base} if base else None,
        network_mode="none",
        decode=True,
    ):
        if "error" in chunk:
            tail = "\n".join(recent)
            raise RecipeFailed(
                f"{entry.name}: a step of {dockerfile} failed: {str(chunk['error']).strip()}\n{tail}"
            )
        image_id = str((chunk.get("aux") or {}).get("ID") or image_id)
        for line in str(chunk.get("stream") or "").splitlines():
            step_image = _STEP_IMAGE.match(line)
            if step_image:
                made.append(step_image.group(1))
            if not line.strip() or _BUILDER_CHATTER.match(line):
                continue
            recent.append(line)
            say(line if line.startswith("Step ") else f"  {line}")
    return image_id or str(client.api.inspect_image(entry.name)["Id"])


def _labelled(files: list[RecipeFile], labels: dict[str, str]) -> list[RecipeFile]:
    """The recipe with its labels set by one last Dockerfile step: the engine's classic builder would spend a
    step, a second or so, on each label given to it through the API."""
    line = "LABEL " + " ".join(f"{json.dumps(key)}={json.dumps(value)}" for key, value in labels.items())
    return [
        dataclasses.replace(file, data=file.data.rstrip(b"\n") + f"\n{line}\n".encode())
        if file.path == "Dockerfile"
        else file
        for file in files
    ]


def _pull(
    client: docker.DockerClient, entry: CatalogEntry, *, started: float, say: Progress, progress: Progress
) -> ImageResult:
    old = _inspect(client, entry.name)
    progress(f"{entry.name}: pulling {entry.pull}")
    repository, tag = docker.utils.parse_repository_tag(entry.pull)
    try:
        for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise docker.errors.APIError(str(event["error"]))
            if event.get("progressDetail") is not None and event.get("status") in ("Downloading", "Extracting"):
                continue
            say(" ".join(str(part) for part in (event.get("id"), event.get("status")) if part))
    except docker.errors.APIError as exc:
        raise ImageBuildError(
            f"{entry.name}: cannot pull {entry.pull}: {_explain(exc)}. Without a registry, build the images "
            "instead (SANDBOX_IMAGE_SOURCE = 'build')"
        ) from exc
    name_repository, name_tag = docker.utils.parse_repository_tag(entry.name)
    client.api.tag(entry.pull, name_repository, name_tag, force=True)
    image = client.api.inspect_image(entry.name)
    if old is not None and old["Id"] == image["Id"]:
        progress(f"{entry.name}: current ({_short(image['Id'])}, as pulled from {entry.pull})")
        return ImageResult(entry.name, "current", image["Id"], int(image.get("Size") or 0), _since(started))
    if old is not None:
        _retire(client, old["Id"], say=say)
    say(f"pulled {entry.name} {_short(image['Id'])} in {_since(started):.1f} s")
    return ImageResult(entry.name, "pulled", image["Id"], int(image.get("Size") or 0), _since(started))


def _retire(client: docker.DockerClient, image_id: str, *, say: Progress) -> None:
    """Remove the image a build or pull replaced, unless it still has a tag or something still uses it."""
    try:
        image = _inspect(client, image_id)
        if image is None or _tags(image):
            return
        client.api.remove_image(image_id)
        say(f"removed the image it replaced, {_short(image_id)}")
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            say(f"kept the image it replaced, {_short(image_id)}: a container or an image still uses it")
        elif exc.status_code != 404:
            log.warning("could not remove the replaced image %s", image_id, exc_info=True)
            say(f"could not remove the image it replaced, {_short(image_id)}: {_explain(exc)}")
    except _ENGINE_FAILURES as exc:
        log.warning("could not remove the replaced image %s", image_id, exc_info=True)
        say(f"could not remove the image it replaced, {_short(image_id)}: {_explain(exc)}")


def _discard(client: docker.DockerClient, image_ids: list[str]) -> int:
    """Remove untagged images, newest first, each with its untagged parents; return how many went.

    An image with a tag, a child or a container stays.
    """
    removed = 0
    for image_id in image_ids:
        try:
            image = _inspect(client, image_id)
            if image is not None and not _tags(image):
                client.api.remove_image(image["Id"])
                removed += 1
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                log.warning("could not remove the image %s", image_id, exc_info=True)
        except _ENGINE_FAILURES:
            log.warning("could not remove the image %s", image_id, exc_info=True)
    return removed


def _sweep(client: docker.DockerClient, entry: CatalogEntry, *, progress: Progress) -> None:
    """Remove the dangling images earlier builds of this entry left: the bases and steps of an interrupted
    build, and the images a build replaced while a container still used them.

    Images built on a curated image inherit its labels, so a label alone does not tell them apart; but only a
    curated image's own last step set its recipe label, and only an unfinished build lacks one.
    """
    leftovers = []
    for listed in client.api.images(filters={"dangling": True, "label": f"{CATALOG}={entry.name}"}):
        recipe = (listed.get("Labels") or {}).get(RECIPE)
        if recipe is None:
            leftovers.append(str(listed["Id"]))
            continue
        image = _inspect(client, str(listed["Id"]))
        parent = _inspect(client, image["Parent"]) if image and image.get("Parent") else None
        if image is not None and (parent is None or _labels(parent).get(RECIPE) != recipe):
            leftovers.append(str(listed["Id"]))
    removed = _discard(client, leftovers)
    if removed:
        progress(f"{entry.name}: removed {removed} dangling image(s) that earlier builds left")


def _remove_build_dir(path: Path, say: Progress) -> None:
    try:
        build_dir_remove(path)
    except (ImageBuildError, OSError) as exc:
        log.warning("could not remove the build directory %s", path, exc_info=True)
        say(f"could not remove {path}: {exc}; the next build tries again")


def _engine() -> docker.DockerClient:
    url = settings.SANDBOX_DOCKER_URL
    try:
        client = docker.DockerClient(base_url=url, timeout=10)
        client.ping()
    except _ENGINE_FAILURES as exc:
        raise EngineUnreachable(
            f"the Docker engine at {url} cannot be reached ({_explain(exc)}); start it, or point "
            "LAYERCAKE_DOCKER_URL at it"
        ) from exc
    client.api.timeout = ENGINE_TIMEOUT
    return client


@contextmanager
def _build_lock(progress: Progress) -> Iterator[None]:
    root = _build_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another image build on this host to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _inspect(client: docker.DockerClient, reference: str) -> dict[str, Any] | None:
    try:
        image: dict[str, Any] = client.api.inspect_image(reference)
    except docker.errors.ImageNotFound:
        return None
    return image


def _tags(image: dict[str, Any]) -> list[str]:
    return [tag for tag in image.get("RepoTags") or [] if tag != "<none>:<none>"]


def _labels(image: dict[str, Any]) -> dict[str, str]:
    return dict((image.get("Config") or {}).get("Labels") or {})


def _data_dir() -> Path:
    return Path(settings.DATA_DIR)


def _build_root() -> Path:
    return _data_dir() / "build"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
