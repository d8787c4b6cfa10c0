"""The Docker backend against the real engine."""

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from django.conf import settings
from django.test import override_settings

from sandbox.backends.base import EngineUnavailable, SandboxPhase, SandboxSpec
from sandbox.backends.docker import MANAGED, DockerBackend, sandbox_name

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("engine_cleanup")]

SHELL_IMAGE = "layercake/shell:latest"
_next_session = iter(range(900_000, 1_000_000))


def _spec(*, lifetime: int = 600) -> SandboxSpec:
    return SandboxSpec(
        session_id=next(_next_session),
        owner_key="anon-test",
        image=SHELL_IMAGE,
        expires_at=int(time.time()) + lifetime,
        memory_mb=128,
        cpu_milli=250,
        pids_limit=64,
    )


@pytest.fixture
def engine() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL)
    yield client
    client.close()


def _run(engine: docker.DockerClient, container: str, command: str) -> tuple[int, str]:
    result = engine.containers.get(container).exec_run(["sh", "-c", command])
    return result.exit_code, result.output.decode(errors="replace")


def test_a_sandbox_is_confined(engine: docker.DockerClient) -> None:
    backend = DockerBackend()
    spec = _spec()
    steps: list[str] = []
    state = backend.start(spec, progress=steps.append)
    assert steps == ["creating", "starting"]
    assert backend.poll(state).phase == SandboxPhase.RUNNING
    info = engine.api.inspect_container(state["container"])
    host = info["HostConfig"]
    assert host["Memory"] == 128 * 2**20 and host["MemorySwap"] == 128 * 2**20
    assert host["NanoCpus"] == 250_000_000
    assert host["PidsLimit"] == 64
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not host["Privileged"]
    assert not host.get("PortBindings")
    assert host["NetworkMode"] == sandbox_name(spec.session_id)
    labels = info["Config"]["Labels"]
    assert labels["layercake.managed"] == "1"
    assert labels["layercake.session"] == str(spec.session_id)
    assert labels["layercake.owner"] == "anon-test"
    assert labels["layercake.expires"] == str(spec.expires_at)
    network = engine.api.inspect_network(state["network"])
    assert network["Internal"] is True
    assert network["Labels"]["layercake.session"] == str(spec.session_id)
    backend.stop(state)
    backend.stop(state)
    assert backend.poll(state).phase == SandboxPhase.MISSING
    assert not engine.api.networks(names=[state["network"]])


def test_a_sandbox_ends_itself_at_expiry_with_no_worker(engine: docker.DockerClient) -> None:
    backend = DockerBackend()
    state = backend.start(_spec(lifetime=3), progress=lambda step: None)
    deadline = time.monotonic() + 20
    while backend.poll(state).phase != SandboxPhase.MISSING:
        assert time.monotonic() < deadline, "the container outlived its expiry"
        time.sleep(0.5)
    backend.stop(state)


def _can_connect(engine: docker.DockerClient, container: str, address: str, port: int) -> bool:
    code, _ = _run(engine, container, f"timeout 3 bash -c 'echo hi > /dev/tcp/{address}/{port}'")
    return code == 0


def test_the_sandbox_cannot_reach_this_machine(engine: docker.DockerClient) -> None:
    """A listener on every address of this machine stays out of reach, while the same probe does reach a
    neighbour on the sandbox's own network (so the probe itself is known to work)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    backend = DockerBackend()
    spec = _spec()
    state = backend.start(spec, progress=lambda step: None)
    neighbour = engine.containers.run(
        "busybox:latest",
        ["nc", "-l", "-p", "7777"],
        name=f"{state['container']}-neighbour",
        network=state["network"],
        labels={"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE},
        detach=True,
        remove=True,
    )
    try:
        assert _can_connect(engine, state["container"], neighbour.name, 7777)
        # The first address of each network is where this machine would answer, if anywhere.
        addresses = [
            str(
                next(ipaddress.ip_network(engine.api.inspect_network(name)["IPAM"]["Config"][0]["Subnet"]).hosts())
            )
            for name in (state["network"], "bridge")
        ]
        for address in [*addresses, "127.0.0.1"]:
            assert not _can_connect(engine, state["container"], address, port), f"reached {address}:{port}"
        assert accepted == []
    finally:
        stop.set()
        thread.join()
        listener.close()
        with contextlib.suppress(docker.errors.NotFound):
            neighbour.remove(force=True)
        backend.stop(state)


def _student_image(engine: docker.DockerClient, *, namespace: str, session: int) -> str:
    """An image as a student's build or commit leaves it: labelled as theirs, named under their prefix."""
    labels = {MANAGED: "1", "layercake.namespace": namespace, "layercake.session": str(session)}
    container = engine.api.create_container("busybox:latest", command=["true"], labels=labels)
    try:
        return str(
            engine.api.commit(container["Id"], repository=f"{namespace}-s{session}/app", conf={"Labels": labels})[
                "Id"
            ]
        )
    finally:
        engine.api.remove_container(container["Id"], force=True)


def _image_exists(engine: docker.DockerClient, ref: str) -> bool:
    try:
        engine.api.inspect_image(ref)
    except docker.errors.NotFound:
        return False
    return True


def test_the_reaper_removes_only_this_sites_orphans(engine: docker.DockerClient) -> None:
    backend = DockerBackend()
    kept = backend.start(_spec(), progress=lambda step: None)
    orphan = backend.start(_spec(), progress=lambda step: None)
    kept_id = int(kept["container"].rsplit("-", 1)[1])
    orphan_id = int(orphan["container"].rsplit("-", 1)[1])
    namespace = settings.SANDBOX_NAMESPACE
    kept_image = _student_image(engine, namespace=namespace, session=kept_id)
    orphan_image = _student_image(engine, namespace=namespace, session=orphan_id)
    elsewhere_image = _student_image(engine, namespace=f"{namespace}x", session=orphan_id)
    # A name the orphan's student gave a curated image: the image is the course's, the name theirs.
    engine.api.tag(SHELL_IMAGE, f"{namespace}-s{orphan_id}/myshell", "latest")
    try:
        with override_settings(SANDBOX_NAMESPACE=f"{namespace}x"):
            assert DockerBackend().reap(keep={orphan_id}) == []
        removed = backend.reap(keep={kept_id})
        assert f"container {orphan['container']}" in removed
        assert f"network {orphan['network']}" in removed
        assert f"images of session {orphan_id}" in removed
        assert not _image_exists(engine, orphan_image)
        assert not _image_exists(engine, f"{namespace}-s{orphan_id}/myshell:latest")
        assert _image_exists(engine, SHELL_IMAGE)
        assert _image_exists(engine, kept_image) and _image_exists(engine, elsewhere_image)
        assert backend.poll(kept).phase == SandboxPhase.RUNNING
        assert backend.reap(keep={kept_id}) == []
    finally:
        backend.stop(kept)
        for ref in (kept_image, elsewhere_image, f"{namespace}-s{orphan_id}/myshell:latest"):
            with contextlib.suppress(docker.errors.NotFound):
                engine.api.remove_image(ref, force=True)


def test_an_unreachable_engine_is_a_clear_error(tmp_path: Path) -> None:
    with (
        override_settings(SANDBOX_DOCKER_URL=f"unix://{tmp_path}/no-engine.sock"),
        pytest.raises(EngineUnavailable),
    ):
        DockerBackend().start(_spec(), progress=lambda step: None)


def test_two_teardowns_of_one_sandbox_at_once_both_succeed_and_leave_nothing(engine: docker.DockerClient) -> None:
    # The reaper tears down a stopping sandbox while its teardown task may be doing the same: the second to
    # come finds the container already being removed, and its network still held by it for a moment.
    backend = DockerBackend()
    spec = _spec()
    state = backend.start(spec, progress=lambda step: None)
    failures: list[BaseException] = []
    go = threading.Barrier(2)

    def teardown() -> None:
        go.wait()
        try:
            backend.stop(state)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=teardown) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a teardown hung"
    assert failures == []
    session = {"label": [f"layercake.session={spec.session_id}"]}
    assert engine.api.containers(all=True, filters=session) == []
    assert engine.api.networks(filters=session) == []
