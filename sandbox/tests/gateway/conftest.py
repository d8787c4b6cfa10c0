"""Fixtures for the gateway: a real gateway process, a curated image of this test run, student sessions on
the real engine, a raw HTTP client for the session's socket, and the workstation's docker CLI."""

import http.client
import http.server
import io
import json
import secrets
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from django.conf import settings

from tests.gateway_process import GatewayProcess

WORKSTATION_IMAGE = "layercake/workstation:latest"
BASE_DIR = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.APIClient]:
    client = docker.APIClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=120)
    yield client
    client.close()


def _busybox_context() -> bytes:
    buffer = io.BytesIO()
    dockerfile = b'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    dockerfile += b'ENV PATH=/bin\nCMD ["sh"]\n'
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        archive.addfile(info, io.BytesIO(dockerfile))
        archive.add(shutil.which("busybox") or "/bin/busybox", arcname="busybox")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def curated_image(engine: docker.APIClient) -> Iterator[str]:
    """A curated image of this test run, labelled as the catalog labels its images."""
    if not shutil.which("busybox"):
        pytest.skip("busybox-static is needed on the host to build the test run's curated image")
    name = f"{settings.SANDBOX_NAMESPACE}-busybox:latest"
    labels = {
        "layercake.managed": "1",
        "layercake.catalog": name,
        "layercake.namespace": settings.SANDBOX_NAMESPACE,
    }
    output = list(
        engine.build(
            fileobj=io.BytesIO(_busybox_context()),
            custom_context=True,
            tag=name,
            labels=labels,
            rm=True,
            decode=True,
        )
    )
    if not any("aux" in line for line in output):
        raise RuntimeError(f"could not build the curated image: {output[-3:]}")
    yield name
    try:
        engine.remove_image(name, force=True)
    except docker.errors.APIError as exc:
        if exc.status_code not in (404, 409):
            raise


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 60) -> None:
        super().__init__("docker", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None

    @property
    def message(self) -> str:
        data = self.json()
        return str(data.get("message", "")) if isinstance(data, dict) else ""


# A build step whose output no other build can make: sixteen random bytes, kept in /key and printed in hex.
KEY_STEP = "RUN head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' | tee /key; echo"


def printed_key(output: bytes) -> bytes:
    """What KEY_STEP printed in a build's output: its random bytes, in hex, on a line of their own."""
    text = "".join(json.loads(line).get("stream", "") for line in output.splitlines() if line.strip())
    return next(
        line for line in text.split() if len(line) == 32 and all(c in "0123456789abcdef" for c in line)
    ).encode()


def dockerfile_context(dockerfile: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class StudentSession:
    session_id: int
    directory: Path
    network: str

    @property
    def socket(self) -> Path:
        return self.directory / "docker.sock"

    def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        connection = UnixHTTPConnection(self.socket)
        try:
            all_headers = dict(headers or {})
            if payload is not None:
                body = json.dumps(payload).encode()
                all_headers.setdefault("Content-Type", "application/json")
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            return Answer(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
        finally:
            connection.close()

    def raw(self, data: bytes, *, read_until_close: bool = True, timeout: float = 20) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(data)
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except TimeoutError:
                if read_until_close:
                    raise
            return b"".join(chunks)

    def build(self, dockerfile: str, tag: str = "") -> Answer:
        """`docker build` of a context that holds only the Dockerfile, as the classic builder is asked."""
        path = "/v1.41/build" + (f"?t={tag}" if tag else "")
        return self.call(
            "POST", path, body=dockerfile_context(dockerfile), headers={"Content-Type": "application/x-tar"}
        )

    def run(self, image: str, cmd: list[str], name: str = "", **extra: Any) -> str:
        """Create and start a container as the docker CLI does; return its id."""
        path = "/v1.41/containers/create" + (f"?name={name}" if name else "")
        answer = self.call("POST", path, {"Image": image, "Cmd": cmd, **extra})
        assert answer.status == 201, answer.body
        container_id = str(answer.json()["Id"])
        started = self.call("POST", f"/v1.41/containers/{container_id}/start")
        assert started.status == 204, started.body
        return container_id


def _wait_for_socket(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(path))
                sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the gateway did not serve {path}")


@pytest.fixture
def student_factory(gateway_process: GatewayProcess, engine: docker.APIClient) -> Iterator[Any]:
    """Open sandbox sessions as the launcher does (network, then gateway), and purge them afterwards."""
    from sandbox.gateway.client import gateway_session_close, gateway_session_open, gateway_session_purge

    opened: list[StudentSession] = []

    def open_session(
        *, memory_budget_mb: int = 512, max_containers: int = 8, expires_in: int = 3600, disk_budget_mb: int = 1024
    ) -> StudentSession:
        session_id = 2_000_000_000 + secrets.randbelow(100_000_000)
        network = f"{settings.SANDBOX_NAMESPACE}-sb-{session_id}"
        labels = {
            "layercake.managed": "1",
            "layercake.namespace": settings.SANDBOX_NAMESPACE,
            "layercake.session": str(session_id),
        }
        engine.create_network(network, driver="bridge", internal=True, labels=labels)
        session = StudentSession(session_id=session_id, directory=Path(), network=network)
        opened.append(session)
        session.directory = gateway_session_open(
            session_id=session_id,
            owner_key=f"owner-{session_id}",
            expires_at=int(time.time()) + expires_in,
            memory_budget_mb=memory_budget_mb,
            max_containers=max_containers,
            disk_budget_mb=disk_budget_mb,
        )
        _wait_for_socket(session.socket)
        return session

    yield open_session
    for session in opened:
        gateway_session_purge(session_id=session.session_id)
        gateway_session_close(session_id=session.session_id)
        for container in engine.containers(all=True, filters={"label": f"layercake.session={session.session_id}"}):
            engine.remove_container(container["Id"], force=True, v=True)
        try:
            engine.remove_network(session.network)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                raise


@pytest.fixture
def student(student_factory: Any) -> StudentSession:
    return student_factory()  # type: ignore[no-any-return]


def owned_objects(engine: docker.APIClient, session: StudentSession) -> dict[str, list[Any]]:
    label = {"label": [f"layercake.session={session.session_id}"]}
    prefix = f"{settings.SANDBOX_NAMESPACE}-s{session.session_id}"
    return {
        "containers": engine.containers(all=True, filters=label),
        "images": [
            image
            for image in engine.images(all=True)
            if (image.get("Labels") or {}).get("layercake.session") == str(session.session_id)
            or any(tag.startswith(prefix) for tag in image.get("RepoTags") or [])
        ],
        "volumes": (engine.volumes(filters=label) or {}).get("Volumes") or [],
    }


@dataclass
class Workstation:
    """The workstation image's docker CLI, as the student runs it (uid 1000, no capabilities)."""

    engine: docker.APIClient
    container_id: str

    def docker(
        self, command: str, *, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        script = f"cd /tmp/work 2>/dev/null || true; {command}"
        if stdin is not None:
            script = f"printf %s {json.dumps(stdin)} | ({script})"
        exec_id = self.engine.exec_create(
            self.container_id,
            ["bash", "-lc", script],
            user="1000",
            environment={"DOCKER_BUILDKIT": "0", **(env or {})},
        )["Id"]
        output = self.engine.exec_start(exec_id, demux=False)
        code = self.engine.exec_inspect(exec_id)["ExitCode"]
        return int(code), output.decode("utf-8", "replace")


def _start_workstation(
    engine: docker.APIClient, *, name: str, binds: list[str], network: str | None, user: str
) -> str:
    host_config = engine.create_host_config(
        binds=binds, cap_drop=["ALL"], network_mode=network, security_opt=["no-new-privileges:true"]
    )
    container = engine.create_container(
        WORKSTATION_IMAGE,
        command=["sleep", "infinity"],
        entrypoint=[],
        user=user,
        name=name,
        host_config=host_config,
        labels={
            "layercake.managed": "1",
            "layercake.namespace": settings.SANDBOX_NAMESPACE,
            "layercake.role": "workstation-test",
        },
    )
    engine.start(container["Id"])
    engine.exec_start(engine.exec_create(container["Id"], ["mkdir", "-p", "/tmp/work"], user=user)["Id"])
    return str(container["Id"])


@pytest.fixture
def workstation_factory(engine: docker.APIClient) -> Iterator[Any]:
    try:
        engine.inspect_image(WORKSTATION_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{WORKSTATION_IMAGE} is not built yet (it is built by the curated images' build)")
    started: list[str] = []

    def for_session(session: StudentSession) -> Workstation:
        name = f"{settings.SANDBOX_NAMESPACE}-sb-{session.session_id}"
        container_id = _start_workstation(
            engine,
            name=name,
            binds=[f"{session.directory}:/run/layercake:ro"],
            network=session.network,
            user="1000",
        )
        started.append(container_id)
        return Workstation(engine, container_id)

    def baseline() -> Workstation:
        """The same CLI straight against the engine's socket: only for comparing output (test-only)."""
        socket_path = settings.SANDBOX_DOCKER_URL.removeprefix("unix://")
        name = f"{settings.SANDBOX_NAMESPACE}-baseline-{secrets.token_hex(4)}"
        container_id = _start_workstation(
            engine, name=name, binds=[f"{socket_path}:/run/layercake/docker.sock"], network=None, user="0"
        )
        started.append(container_id)
        workstation = Workstation(engine, container_id)
        original = workstation.docker

        def as_root(command: str, **kwargs: Any) -> tuple[int, str]:
            script = f"cd /tmp/work 2>/dev/null || true; {command}"
            exec_id = engine.exec_create(
                container_id, ["bash", "-lc", script], user="0", environment={"DOCKER_BUILDKIT": "0"}
            )["Id"]
            output = engine.exec_start(exec_id)
            return int(engine.exec_inspect(exec_id)["ExitCode"]), output.decode("utf-8", "replace")

        del original
        workstation.docker = as_root  # type: ignore[method-assign]
        return workstation

    yield type("Factory", (), {"for_session": staticmethod(for_session), "baseline": staticmethod(baseline)})
    for container_id in started:
        try:
            engine.remove_container(container_id, force=True, v=True)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                raise


# Sandboxes as the launcher makes them: the session network with its named bridge (so the host firewall rule
# applies), the workstation container, and the gateway session, all through `DockerBackend.start`.

LAUNCHER_IDS = (100_000_000, 250_000_000)  # bridge names hold at most 7 hex digits of the session id


@dataclass
class LiveSandbox:
    session_id: int
    owner_key: str
    state: dict[str, Any]
    workstation: Workstation
    engine: docker.APIClient

    @property
    def network(self) -> str:
        return str(self.state["network"])

    @property
    def socket(self) -> Path:
        return Path(settings.GATEWAY_DIR) / str(self.session_id) / "docker.sock"

    def host_address(self) -> str:
        """This machine's address on the session's bridge."""
        return str(self.engine.inspect_network(self.network)["IPAM"]["Config"][0]["Gateway"]).split("/")[0]

    def address_of(self, container: str) -> str:
        """A container's address on the session network (container given by its engine name or id)."""
        networks = self.engine.inspect_container(container)["NetworkSettings"]["Networks"]
        return str(networks[self.network]["IPAddress"])

    def engine_name(self, student_name: str) -> str:
        return f"{settings.SANDBOX_NAMESPACE}-s{self.session_id}-{student_name}"


class SandboxLauncher:
    """Starts workstation sandboxes with the real launcher; `cleanup` removes everything of their sessions."""

    def __init__(self, engine: docker.APIClient) -> None:
        from sandbox.backends.docker import DockerBackend

        try:
            engine.inspect_image(WORKSTATION_IMAGE)
        except docker.errors.ImageNotFound:
            pytest.skip(f"{WORKSTATION_IMAGE} is not built yet (it is built by the curated images' build)")
        self.engine = engine
        self.backend = DockerBackend()
        self.started: list[tuple[int, dict[str, Any]]] = []

    def start(self, *, owner_key: str = "") -> LiveSandbox:
        from sandbox.backends.base import SandboxSpec

        session_id = LAUNCHER_IDS[0] + secrets.randbelow(LAUNCHER_IDS[1] - LAUNCHER_IDS[0])
        owner_key = owner_key or f"owner-{session_id}"
        spec = SandboxSpec(
            session_id=session_id,
            owner_key=owner_key,
            image=WORKSTATION_IMAGE,
            expires_at=int(time.time()) + 900,
            memory_mb=256,
            cpu_milli=500,
            pids_limit=256,
            labels={"layercake.test": "gateway"},
        )
        name = f"{settings.SANDBOX_NAMESPACE}-sb-{session_id}"
        self.started.append((session_id, {"container": name, "network": name, "gateway": True}))
        state = self.backend.start(spec, progress=lambda step: None)
        self.started[-1] = (session_id, state)
        sandbox = LiveSandbox(
            session_id=session_id,
            owner_key=owner_key,
            state=state,
            workstation=Workstation(self.engine, str(state["container_id"])),
            engine=self.engine,
        )
        _wait_for_socket(sandbox.socket)
        exec_id = self.engine.exec_create(state["container_id"], ["mkdir", "-p", "/tmp/work"], user="1000")["Id"]
        self.engine.exec_start(exec_id)
        return sandbox

    def cleanup(self) -> None:
        """The launcher's own teardown, then whatever still carries a session's labels (even if it failed)."""
        errors: list[Exception] = []
        for session_id, state in self.started:
            try:
                self.backend.stop(state)
            except Exception as exc:
                errors.append(exc)
            mine = {
                "label": [f"layercake.session={session_id}", f"layercake.namespace={settings.SANDBOX_NAMESPACE}"]
            }
            for container in self.engine.containers(all=True, filters=mine):
                _remove_quietly(self.engine.remove_container, container["Id"], force=True, v=True)
            for network in self.engine.networks(filters=mine):
                _remove_quietly(self.engine.remove_network, network["Id"])
        self.started.clear()
        if errors:
            raise errors[0]


def _remove_quietly(remove: Any, *args: Any, **kwargs: Any) -> None:
    try:
        remove(*args, **kwargs)
    except docker.errors.APIError as exc:
        if exc.status_code not in (404, 409):
            raise


@pytest.fixture
def sandbox_factory(gateway_process: GatewayProcess, engine: docker.APIClient) -> Iterator[Any]:
    """`sandbox_factory(owner_key=...)` starts a sandbox as the launcher does; all are removed afterwards."""
    launcher = SandboxLauncher(engine)
    yield launcher.start
    launcher.cleanup()


class TokenServer:
    """A tiny web app on this machine that answers with a token and remembers who asked."""

    def __init__(self, address: str) -> None:
        self.token = f"host-app-{secrets.token_hex(6)}"
        self.clients: list[str] = []
        token, clients = self.token, self.clients

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                clients.append(self.client_address[0])
                body = token.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, address: str) -> str:
        with socket.create_connection((address, self.port), timeout=3) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
