"""Sandboxes as containers on the local Docker engine.

Each sandbox is one container running the image's shell on a TTY, on a network of its own that has no
egress. Names derive from the session id and every object carries the project's labels, so the reaper
finds all of them after any crash. Blocking SDK calls run only in workers; the terminal uses aiodocker.
"""

import asyncio
import hashlib
import logging
import time
from typing import Any

import aiodocker
import docker
import docker.errors
import redis
import requests.exceptions
from django.conf import settings

from sandbox.gateway.policy import DNS_OPTIONS

from .base import (
    EngineUnavailable,
    ImageMissing,
    Poll,
    ProgressCallback,
    SandboxBackend,
    SandboxError,
    SandboxPhase,
    SandboxSpec,
)

log = logging.getLogger(__name__)

MANAGED = "layercake.managed"
SESSION = "layercake.session"
OWNER = "layercake.owner"
EXPIRES = "layercake.expires"
ROLE = "layercake.role"
NAMESPACE = "layercake.namespace"

# An image labelled so is a workstation: its docker CLI talks to the session's gateway socket.
WORKSTATION_LABEL = "layercake.workstation"
GATEWAY_MOUNT = "/run/layercake"
READ_BATCH_BYTES = 64 * 1024
NETWORK_REMOVE_ATTEMPTS = 10  # 5.5 s in all
# What a root shell needs to work on its own files; everything else is dropped.
ROOT_SHELL_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL"]
# The engine keeps no log of a sandbox's TTY: its log copier costs a cut per line (a `yes` flood runs at a
# quarter of the speed), and the relay keeps what a browser needs. So that nothing the shell prints is lost
# before the terminal attaches (the prompt, the workstation's welcome), the shell waits behind a gate until
# the terminal's first byte, which the gate swallows unechoed.
LOG_CONFIG = {"Type": "none", "Config": {}}
SHELL_GATE = 'stty -echo -icanon min 1 2>/dev/null; head -c 1 >/dev/null; stty echo icanon 2>/dev/null; exec "$@"'
GATE_NAME = "layercake-gate"
GATE_KEY = b"\r"
REDRAW_KEY = b"\x0c"
GATE_WAIT_SECONDS = 5.0


# Every sandbox network's bridge on the host is named with this prefix, so one host firewall rule (which
# `./layercake setup` installs) can refuse new connections from any sandbox to the host itself: an internal
# network still gives the host an address on its bridge, where services listening on all addresses answer.
BRIDGE_PREFIX = "lcsb"


def bridge_name(session_id: int) -> str:
    """The host interface of the sandbox's network: the prefix, four hex digits of the namespace, the id in
    hex; at most 15 characters, as Linux requires."""
    namespace = hashlib.sha256(settings.SANDBOX_NAMESPACE.encode()).hexdigest()[:4]
    name = f"{BRIDGE_PREFIX}{namespace}{session_id:x}"
    if len(name) > 15:
        raise SandboxError(f"session id {session_id} is too large for a bridge name")
    return name


def sandbox_name(session_id: int) -> str:
    return f"{settings.SANDBOX_NAMESPACE}-sb-{session_id}"


def sandbox_labels(spec: SandboxSpec) -> dict[str, str]:
    return {
        MANAGED: "1",
        NAMESPACE: settings.SANDBOX_NAMESPACE,
        SESSION: str(spec.session_id),
        OWNER: spec.owner_key,
        EXPIRES: str(spec.expires_at),
        **spec.labels,
    }


def _files_in_memory(image: dict[str, Any], *, runs_as_root: bool, files_mb: int) -> dict[str, str]:
    """The places a shell writes, each in memory with its size, past which a write fails as on a full disk:
    the home of the image's user, /tmp and /var/tmp."""
    scratch = f"rw,exec,nosuid,nodev,size={max(files_mb // 4, 1)}m,mode=1777"
    mounts = {"/tmp": scratch, "/var/tmp": scratch}
    home = _home(image, runs_as_root=runs_as_root)
    if home:
        owner = _home_options(image, runs_as_root=runs_as_root)
        mounts[home] = f"rw,exec,nosuid,nodev,size={files_mb}m,{owner}"
    return mounts


def _home(image: dict[str, Any], *, runs_as_root: bool) -> str | None:
    """The home of the image's user, where a shell's files go: the home its working directory is in."""
    parts = str(image.get("WorkingDir") or "").strip("/").split("/")
    if parts[0] == "home" and len(parts) > 1:
        return f"/home/{parts[1]}"
    if parts[0] == "root":
        return "/root"
    return "/root" if runs_as_root else None


def _home_options(image: dict[str, Any], *, runs_as_root: bool) -> str:
    """Who owns the home in memory: the image's user when it names itself by number (as a curated image does),
    anyone otherwise, as in /tmp."""
    user, _, group = str(image.get("User") or "").partition(":")
    if runs_as_root:
        return "mode=0700"
    if user.isdigit() and (group or user).isdigit():
        return f"mode=0700,uid={user},gid={group or user}"
    return "mode=1777"


def _gone(exc: docker.errors.APIError) -> bool:
    return exc.status_code in (404, 409)


def _in_use(exc: docker.errors.APIError) -> bool:
    """A network that a container being removed still holds an endpoint of, for a moment."""
    return exc.status_code == 403 and "active endpoints" in str(exc.explanation or "")


class DockerBackend(SandboxBackend):
    def __init__(self) -> None:
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=30)
        return self._client

    def start(self, spec: SandboxSpec, *, progress: ProgressCallback) -> dict[str, Any]:
        name = sandbox_name(spec.session_id)
        state: dict[str, Any] = {"container": name, "network": name, "gateway": False}
        try:
            progress("creating")
            image = self._image_config(spec.image)
            state["gateway"] = (image.get("Labels") or {}).get(WORKSTATION_LABEL) == "1"
            self._create_network(name, spec)
            container_id = self._create_container(name, spec, image, gateway=state["gateway"])
            state["container_id"] = container_id
            progress("starting")
            self.client.api.start(container_id)
        except ImageMissing:
            self._abandon(state)
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            self._abandon(state)
            if isinstance(exc, docker.errors.APIError):
                raise SandboxError(f"the engine refused the sandbox: {exc.explanation}") from exc
            raise EngineUnavailable(str(exc)) from exc
        except BaseException:
            self._abandon(state)
            raise
        return state

    def _abandon(self, state: dict[str, Any]) -> None:
        """Remove what a failed start made; what cannot be removed now, the reaper removes later."""
        try:
            self.stop(state)
        except Exception:
            log.warning("could not clean up after a failed start of %s", state.get("container"), exc_info=True)

    def _image_config(self, image: str) -> dict[str, Any]:
        try:
            config: dict[str, Any] = self.client.api.inspect_image(image)["Config"] or {}
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"image {image} is not on this host; build the curated images") from exc
        return config

    def _create_network(self, name: str, spec: SandboxSpec) -> None:
        try:
            self.client.api.create_network(
                name,
                driver="bridge",
                internal=True,
                labels=sandbox_labels(spec),
                options={"com.docker.network.bridge.name": bridge_name(spec.session_id)},
                check_duplicate=True,
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise

    def _create_container(self, name: str, spec: SandboxSpec, image: dict[str, Any], *, gateway: bool) -> str:
        api = self.client.api
        seconds_left = max(1, spec.expires_at - int(time.time()))
        # The timer inside the container ends it at its expiry even when no worker is left to do so;
        # AutoRemove then removes it.
        entrypoint = [
            "timeout",
            "-s",
            "KILL",
            str(seconds_left),
            "sh",
            "-c",
            SHELL_GATE,
            GATE_NAME,
            *(image.get("Entrypoint") or []),
        ]
        command = image.get("Cmd") or ["sh"]
        binds = []
        if gateway:
            from sandbox.gateway.client import gateway_session_open

            directory = gateway_session_open(
                session_id=spec.session_id,
                owner_key=spec.owner_key,
                expires_at=spec.expires_at,
                memory_budget_mb=settings.SANDBOX_STUDENT_MEMORY_MB,
                max_containers=settings.SANDBOX_STUDENT_MAX_CONTAINERS,
                disk_budget_mb=settings.SANDBOX_STUDENT_DISK_MB,
            )
            # Read-only, whoever owns the directory: connecting to the socket needs no write to the mount, and
            # nothing in the workstation may replace the socket, or plant a link where the gateway makes it.
            binds.append(f"{directory}:{GATEWAY_MOUNT}:ro")
        # The image's own user runs the shell; a root shell keeps the few capabilities it needs.
        runs_as_root = (image.get("User") or "root").split(":")[0] in ("", "0", "root")
        # Its files come out of its memory, and with /tmp, /var/tmp and /dev/shm take 1.75 times the home's room:
        # at most a quarter of its memory for the home, so that full, they leave the shell room to run.
        files_mb = max(min(settings.SANDBOX_FILES_MB, spec.memory_mb // 4), 1)
        host_config = api.create_host_config(
            mem_limit=f"{spec.memory_mb}m",
            memswap_limit=f"{spec.memory_mb}m",
            nano_cpus=spec.cpu_milli * 1_000_000,
            pids_limit=spec.pids_limit,
            cap_drop=["ALL"],
            cap_add=ROOT_SHELL_CAPS if runs_as_root else [],
            security_opt=["no-new-privileges:true"],
            init=True,
            auto_remove=True,
            network_mode=name,
            binds=binds or None,
            log_config=LOG_CONFIG,
            dns_opt=DNS_OPTIONS,
            # Nothing the student writes in their shell reaches the engine's disk, where the storage driver sets
            # no quota: the root file system is read-only, and what a shell writes is held in its memory.
            read_only=True,
            tmpfs=_files_in_memory(image, runs_as_root=runs_as_root, files_mb=files_mb),
            shm_size=f"{max(files_mb // 4, 1)}m",
        )
        created = api.create_container(
            image=spec.image,
            name=name,
            entrypoint=entrypoint,
            command=command,
            tty=True,
            stdin_open=True,
            environment={"TERM": "xterm-256color", "LANG": "C.UTF-8"},
            labels={**sandbox_labels(spec), ROLE: "workstation" if gateway else "shell"},
            host_config=host_config,
            hostname="sandbox",
        )
        return str(created["Id"])

    def stop(self, state: dict[str, Any]) -> None:
        name = state.get("container")
        if not name:
            return
        api = self.client.api
        try:
            api.remove_container(name, force=True, v=True)
        except docker.errors.APIError as exc:
            if not _gone(exc):
                raise
        session_id = int(str(name).rsplit("-", 1)[1])
        if state.get("gateway"):
            from sandbox.gateway.client import gateway_session_close, gateway_session_purge

            gateway_session_purge(session_id=session_id)
        self._remove_network(state.get("network") or name)
        if state.get("gateway"):
            try:
                gateway_session_close(session_id=session_id)
            except redis.RedisError:
                # The engine holds nothing of the session now; its record goes with the next teardown or
                # with Redis itself.
                log.warning("could not close the gateway session of %s", name, exc_info=True)

    def _remove_network(self, name: str) -> None:
        # A teardown running alongside this one (the reaper's beside the task's) may still be removing the
        # container: its endpoint holds the network until then. What outlasts the wait is the reaper's.
        for attempt in range(NETWORK_REMOVE_ATTEMPTS):
            try:
                self.client.api.remove_network(name)
                return
            except docker.errors.APIError as exc:
                if _gone(exc):
                    return
                if not _in_use(exc):
                    raise
            time.sleep(0.1 * (attempt + 1))
        log.warning("network %s still has endpoints; the reaper removes it later", name)

    def poll(self, state: dict[str, Any]) -> Poll:
        try:
            info = self.client.api.inspect_container(state["container"])
        except docker.errors.NotFound:
            return Poll(SandboxPhase.MISSING)
        if info["State"]["Running"]:
            return Poll(SandboxPhase.RUNNING)
        return Poll(SandboxPhase.EXITED, exit_code=info["State"].get("ExitCode"))

    def reap(self, *, keep: set[int]) -> list[str]:
        from sandbox.gateway.client import gateway_session_purge, sessions_with_images

        api = self.client.api
        removed: list[str] = []
        # What a student built, committed or named outlives their sandbox's teardown when the teardown did not
        # run (the record deleted) or failed part way. Listed first, while `keep` is fresh: a sandbox started
        # since has had no time to make images, so none of a live one is taken for an orphan's.
        image_sessions = sessions_with_images()
        mine = {"label": [f"{MANAGED}=1", f"{NAMESPACE}={settings.SANDBOX_NAMESPACE}"]}
        for container in api.containers(all=True, filters=mine):
            session = _session_of(container.get("Labels") or {})
            if session is None or session in keep:
                continue
            try:
                api.remove_container(container["Id"], force=True, v=True)
                removed.append(f"container {container['Names'][0].lstrip('/')}")
            except docker.errors.APIError as exc:
                if not _gone(exc):
                    raise
        for network in api.networks(filters=mine):
            session = _session_of(network.get("Labels") or {})
            if session is None or session in keep:
                continue
            try:
                api.remove_network(network["Id"])
                removed.append(f"network {network['Name']}")
            except docker.errors.APIError as exc:
                # One whose container is still being removed goes at the next round.
                if not (_gone(exc) or _in_use(exc)):
                    raise
        for volume in (api.volumes(filters=mine) or {}).get("Volumes") or []:
            session = _session_of(volume.get("Labels") or {})
            if session is None or session in keep:
                continue
            try:
                api.remove_volume(volume["Name"], force=True)
                removed.append(f"volume {volume['Name']}")
            except docker.errors.APIError as exc:
                if not _gone(exc):
                    raise
        for session in sorted(image_sessions - keep):
            gateway_session_purge(session_id=session)
            removed.append(f"images of session {session}")
        return removed

    async def open_terminal(self, state: dict[str, Any]) -> "DockerTerminal":
        terminal = DockerTerminal(state["container"])
        await terminal.open()
        return terminal


def _session_of(labels: dict[str, str]) -> int | None:
    try:
        return int(labels[SESSION])
    except (KeyError, ValueError):
        return None


class DockerTerminal:
    """The sandbox shell's TTY, attached over the engine's API without blocking the event loop."""

    def __init__(self, container: str) -> None:
        self._container_name = container
        self._docker: aiodocker.Docker | None = None
        self._stream: Any = None
        self._container: Any = None

    async def open(self) -> None:
        url = settings.SANDBOX_DOCKER_URL
        self._docker = aiodocker.Docker(url=url)
        try:
            self._container = await self._docker.containers.get(self._container_name)
            self._stream = self._container.attach(stdin=True, stdout=True, stderr=True)
            await self._stream._init()
        except aiodocker.DockerError as exc:
            await self.close()
            if exc.status == 404:
                raise SandboxError("the sandbox container is gone") from exc
            raise SandboxError(f"cannot attach to the sandbox: {exc.message}") from exc
        except AssertionError as exc:
            # aiodocker asserts that the upgraded connection has a transport: the engine closed it, as it does
            # when the container goes as it is attached to.
            await self.close()
            raise SandboxError("cannot attach to the sandbox: the engine closed the connection") from exc
        except (TimeoutError, OSError) as exc:
            await self.close()
            raise EngineUnavailable(str(exc)) from exc
        await self._release_gate()

    async def _release_gate(self) -> None:
        """Let a new sandbox's shell start, or make a running program redraw after a re-attach.

        The gate's byte is sent only once its `head` is waiting, which is after it turned echo off, so
        the byte is never echoed. With no gate left, a form feed asks the program in front to redraw.
        """
        deadline = time.monotonic() + GATE_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:
                listing = await self._container.top()
            except aiodocker.DockerError:
                break
            commands = [str(row[-1]) for row in listing.get("Processes") or []]
            if any(command.startswith("head -c 1") for command in commands):
                await self._stream.write_in(GATE_KEY)
                return
            if not any(GATE_NAME in command for command in commands):
                break
            await asyncio.sleep(0.01)
        await self._stream.write_in(REDRAW_KEY)

    async def read(self) -> bytes | None:
        message = await self._stream.read_out()
        if message is None:
            return None
        data = bytearray(message.data)
        # Under a flood the engine delivers many small chunks; what has already arrived goes out as one
        # frame. aiodocker keeps arrived chunks in an aiohttp DataQueue, whose length is public API.
        queue = getattr(self._stream, "_queue", None)
        while queue is not None and len(queue) and len(data) < READ_BATCH_BYTES:
            more = await self._stream.read_out()
            if more is None:
                break
            data += more.data
        return bytes(data)

    async def write(self, data: bytes) -> None:
        await self._stream.write_in(data)

    async def resize(self, *, cols: int, rows: int) -> None:
        try:
            await self._container.resize(h=rows, w=cols)
        except aiodocker.DockerError as exc:
            log.info("resize of %s refused: %s", self._container_name, exc)

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()
        if self._docker is not None:
            docker_client, self._docker = self._docker, None
            await docker_client.close()
