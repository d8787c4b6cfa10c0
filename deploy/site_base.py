"""The base of the site's image, made without a registry: Debian bookworm with Python 3.11.

The site's Dockerfile starts FROM a base that has `python3 -m venv` (BASE_IMAGE, the official
python:3.11-slim-bookworm by default). Where no registry can be reached, this makes an equivalent one the way
the curated images are made (debootstrap, pruned, imported into the engine), and skips it when the image on
the engine was made from the same recipe.

    python -m deploy.site_base [--force]      (as root: debootstrap needs it)
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors

from sandbox.images.catalog import Debootstrap
from sandbox.images.errors import ImageBuildError, RecipeFailed
from sandbox.images.rootfs import (
    build_dir_create,
    build_dir_remove,
    debootstrap_command,
    mirror_check,
    rootfs_debootstrap,
    rootfs_prune,
    rootfs_tar,
)

NAME = "layercake/site-base:bookworm"
RECIPE_LABEL = "layercake.recipe"
SPEC = Debootstrap(
    suite="bookworm",
    mirror="http://deb.debian.org/debian",
    packages=("python3", "python3-venv", "ca-certificates"),
    prune=(
        "dev/*",
        "tmp/*",
        "var/tmp/*",
        "var/lib/apt/lists/*",
        "var/cache/apt/*",
        "var/log/*",
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
    ),
    keep=("usr/share/doc/*/copyright",),
)
# As in the official image: the release, its updates and its security fixes.
SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# Certificate authorities this host trusts beyond Debian's (a TLS-inspecting proxy's, say): the base made here
# trusts them too, and its pip uses the system's store rather than its own, so builds work where the host's do.
LOCAL_AUTHORITIES = Path("/usr/local/share/ca-certificates")
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
# What the official image sets and the site's Dockerfile relies on.
CHANGES = ["ENV LANG=C.UTF-8", 'CMD ["python3"]']


def local_authorities() -> dict[str, str]:
    if not LOCAL_AUTHORITIES.is_dir():
        return {}
    return {
        path.relative_to(LOCAL_AUTHORITIES).as_posix(): path.read_text()
        for path in sorted(LOCAL_AUTHORITIES.rglob("*.crt"))
        if path.is_file()
    }


def recipe_digest() -> str:
    described = {
        "name": NAME,
        "spec": SPEC.__dict__,
        "changes": CHANGES,
        "sources": SOURCES,
        "authorities": local_authorities(),
        "pip": PIP_CONF,
    }
    return "sha256:" + hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()


def site_base_ensure(*, client: docker.DockerClient, data_dir: Path, force: bool) -> str:
    digest = recipe_digest()
    try:
        current = client.api.inspect_image(NAME)
    except docker.errors.ImageNotFound:
        current = None
    labels = ((current or {}).get("Config") or {}).get("Labels") or {}
    if current is not None and not force and labels.get(RECIPE_LABEL) == digest:
        print(f"{NAME}: current ({current['Id'][7:19]})")
        return str(current["Id"])
    with _build_lock(data_dir / "build"):
        return _build(client=client, data_dir=data_dir, digest=digest, current=current)


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """The curated images' build lock: their build removes any build directory it finds while holding it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting for another image build on this host to finish", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(*, client: docker.DockerClient, data_dir: Path, digest: str, current: dict[str, Any] | None) -> str:
    started = time.monotonic()
    print(f"{NAME}: building (debootstrap {SPEC.suite} with {', '.join(SPEC.packages)})", flush=True)
    debootstrap = debootstrap_command()
    mirror_check(mirror=SPEC.mirror, suite=SPEC.suite)
    workdir = build_dir_create(parent=data_dir / "build", name="site-base")
    try:
        rootfs = workdir / "rootfs"
        rootfs_debootstrap(
            debootstrap=debootstrap,
            target=rootfs,
            spec=SPEC,
            cache_dir=data_dir / "cache" / "debootstrap",
            progress=lambda line: print(f"  {line}", flush=True),
        )
        rootfs_prune(root=rootfs, prune=SPEC.prune, keep=SPEC.keep)
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES)
        _trust_local_authorities(rootfs)
        changes = [
            *CHANGES,
            f"LABEL layercake.managed=1 layercake.role=site-base {RECIPE_LABEL}={digest}",
        ]
        repository, tag = NAME.rsplit(":", 1)
        with rootfs_tar(rootfs) as stream:
            answer = client.api.import_image_from_stream(stream, repository=repository, tag=tag, changes=changes)
    finally:
        build_dir_remove(workdir)
    # The engine tags what it imported; an image under the name without this recipe's label means it refused.
    imported = client.api.inspect_image(NAME)
    if ((imported.get("Config") or {}).get("Labels") or {}).get(RECIPE_LABEL) != digest:
        raise RecipeFailed(f"the engine did not import the root file system: {answer}")
    image_id = str(imported["Id"])
    if current is not None and current["Id"] != image_id:
        # Kept while an image built on it uses it; it goes when that one does.
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_image(current["Id"])
    print(f"{NAME}: built {image_id[7:19]} in {time.monotonic() - started:.0f} s")
    return image_id


def _trust_local_authorities(rootfs: Path) -> None:
    authorities = local_authorities()
    for name, text in authorities.items():
        target = rootfs / "usr/local/share/ca-certificates" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if authorities:
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True, capture_output=True)
    (rootfs / "etc/pip.conf").write_text(PIP_CONF)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when the image is current")
    options = parser.parse_args()
    data_dir = Path(os.environ.get("LAYERCAKE_DATA_DIR", "var")).resolve()
    client = docker.DockerClient(base_url=os.environ.get("LAYERCAKE_DOCKER_URL", "unix:///var/run/docker.sock"))
    client.api.timeout = 900
    try:
        site_base_ensure(client=client, data_dir=data_dir, force=options.force)
    except ImageBuildError as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
