"""What the launcher (a Celery task, synchronous) calls to open, close and purge a session's gateway."""

import contextlib
import json
import logging
import re
import shutil
import socket
import time
from pathlib import Path

import docker
import docker.errors
import redis

from .config import gateway_config
from .registry import SessionRecord

log = logging.getLogger(__name__)

OPEN_WAIT_SECONDS = 5.0


def _redis() -> redis.Redis:
    return redis.Redis.from_url(gateway_config().redis_url)


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def gateway_session_open(
    *,
    session_id: int,
    owner_key: str,
    expires_at: int,
    memory_budget_mb: int,
    max_containers: int,
    disk_budget_mb: int,
) -> Path:
    """Register the session and wait (a few seconds at most) until its socket answers.

    Returns the session's directory, which holds only `docker.sock`; the launcher bind-mounts it at
    /run/layercake. If the gateway is down, the directory is returned all the same and the gateway creates
    the socket when it starts.
    """
    config = gateway_config()
    directory = config.session_dir(session_id)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    record = SessionRecord(
        session_id=session_id,
        owner_key=owner_key,
        expires_at=expires_at,
        memory_budget_mb=memory_budget_mb,
        max_containers=max_containers,
        disk_budget_mb=disk_budget_mb,
    )
    client = _redis()
    try:
        client.hset(config.sessions_key, str(session_id), record.dumps())
        client.publish(config.control_channel, json.dumps({"op": "open", "session_id": session_id}))
    finally:
        client.close()
    deadline = time.monotonic() + OPEN_WAIT_SECONDS
    path = config.session_socket(session_id)
    while time.monotonic() < deadline:
        if path.exists() and _answers(path):
            return directory
        time.sleep(0.05)
    log.warning("the gateway did not open session %s within %ss", session_id, OPEN_WAIT_SECONDS)
    return directory


def gateway_session_close(*, session_id: int) -> None:
    """Unregister the session; its socket and directory go. Idempotent."""
    config = gateway_config()
    client = _redis()
    try:
        client.hdel(config.sessions_key, str(session_id))
        client.delete(config.ports_key(session_id))
        client.publish(config.control_channel, json.dumps({"op": "close", "session_id": session_id}))
    finally:
        client.close()
    directory = config.session_dir(session_id)
    deadline = time.monotonic() + 2.0
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(directory, ignore_errors=True)


def _gone(exc: docker.errors.APIError) -> bool:
    # An image removed meanwhile (with a child removed before it, or by another teardown) may be answered
    # "unrecognized image ID" by the engine, with a 500.
    return exc.status_code in (404, 409) or "unrecognized image ID" in str(exc.explanation or "")


def sessions_with_images() -> set[int]:
    """The sessions of this site that the engine holds images or image names of: labelled as theirs, or
    tagged under their prefix (a name a student gave a curated image carries no label of theirs)."""
    config = gateway_config()
    api = docker.APIClient(base_url=f"unix://{config.engine_socket}", timeout=60)
    tagged = re.compile(rf"{re.escape(config.namespace)}-s([0-9]+)(?:-r)?/")
    sessions: set[int] = set()
    try:
        for image in api.images(all=True, filters={"label": [f"layercake.namespace={config.namespace}"]}):
            with contextlib.suppress(KeyError, ValueError):
                sessions.add(int((image.get("Labels") or {})["layercake.session"]))
        for image in api.images():
            for tag in image.get("RepoTags") or []:
                if match := tagged.match(tag):
                    sessions.add(int(match.group(1)))
    finally:
        api.close()
    return sessions


def gateway_session_purge(*, session_id: int) -> None:
    """Remove everything the session's student created: containers (and the gateway's forwarders of their
    ports), their images and tags, volumes. Idempotent: what is already gone (404/409) is skipped."""
    config = gateway_config()
    api = docker.APIClient(base_url=f"unix://{config.engine_socket}", timeout=60)
    mine = [f"layercake.session={session_id}", f"layercake.namespace={config.namespace}"]
    prefix = f"{config.namespace}-s{session_id}"
    try:
        for role in ("student", "port-forwarder"):
            for container in api.containers(all=True, filters={"label": [*mine, f"layercake.role={role}"]}):
                try:
                    api.remove_container(container["Id"], force=True, v=True)
                except docker.errors.APIError as exc:
                    if not _gone(exc):
                        raise
        for image in api.images():
            for tag in image.get("RepoTags") or []:
                if tag.startswith((f"{prefix}/", f"{prefix}-r/")):
                    try:
                        api.remove_image(tag)
                    except docker.errors.APIError as exc:
                        if not _gone(exc):
                            raise
        for _ in range(3):
            left = api.images(all=True, filters={"label": mine})
            if not left:
                break
            for image in left:
                if any(
                    not t.startswith((f"{prefix}/", f"{prefix}-r/"))
                    for t in image.get("RepoTags") or []
                    if t != "<none>:<none>"
                ):
                    continue
                try:
                    api.remove_image(image["Id"], force=True)
                except docker.errors.APIError as exc:
                    if not _gone(exc):
                        raise
        for volume in (api.volumes(filters={"label": mine}) or {}).get("Volumes") or []:
            try:
                api.remove_volume(volume["Name"], force=True)
            except docker.errors.APIError as exc:
                if not _gone(exc):
                    raise
    finally:
        api.close()
