"""Fifth red-team pass: EXPOSE and the variables it names read as the engine reads them, values Python cannot
read, the shared image list under races and long builds, networks by their engine names, published addresses,
host paths in inspect, and pipelined HTTP."""

import asyncio
import json
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import pytest
from django.conf import settings

from sandbox.gateway.client import gateway_session_purge
from sandbox.gateway.config import gateway_config
from sandbox.gateway.imagelist import ImageList
from sandbox.gateway.registry import SessionRecord
from sandbox.gateway.session import StudentGateway

from .conftest import StudentSession, dockerfile_context, owned_objects
from .test_imagelist import CountingEngine

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

# Each names every port to the engine (a port each in the image's configuration), while read otherwise it names
# one or none.
EVERY_PORT = {
    "no host port": "EXPOSE :1-65535\n",
    "an address and no host port": "EXPOSE 0.0.0.0::1-65535\n",
    "leading zeros": "EXPOSE 000001-65535\n",
    "quotes": 'EXPOSE "1-65535"\n',
    "a range of three numbers": "EXPOSE 1-65535-7\n",
    "an ENV that an ARG of its name does not change": "ENV P=1-65535\nARG P\nEXPOSE $P\n",
    "an ENV that a build argument does not change": "ENV P=1-65535\nARG P=80\nEXPOSE $P\n",
    "the default of an ARG before FROM": "ARG P=1-65535\nFROM {base}\nARG P\nEXPOSE $P\n",
    "an old-style ENV with a tab": "ARG P=80\nENV P\t1-65535\nEXPOSE $P\n",
    "an ENV of a name in a variable": "ARG P=80\nARG K=P\nENV $K=1-65535\nEXPOSE $P\n",
    "an ENV of the stage built on": "FROM {base} AS ports\nENV P=1-65535\nFROM ports\nARG P=80\nEXPOSE $P\n",
    "an ENV of the base image": "FROM wide\nARG P=80\nEXPOSE $P\n",
}


@pytest.mark.parametrize("lines", EVERY_PORT.values(), ids=list(EVERY_PORT))
def test_expose_counts_every_port_the_engine_would_expose(
    student: StudentSession, curated_image: str, engine: docker.APIClient, lines: str
) -> None:
    built = student.build(f"FROM {curated_image}\nENV P=1-65535\n", tag="wide")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    dockerfile = lines.format(base=curated_image)
    if not dockerfile.startswith(("ARG P=1-65535", "FROM")):
        dockerfile = f"FROM {curated_image}\n{dockerfile}"
    build_args = {} if lines.startswith("ARG P=1-65535") else {"P": "80"}
    answer = student.call(
        "POST",
        "/v1.41/build?t=grown&buildargs=" + quote(json.dumps(build_args)),
        body=dockerfile_context(dockerfile),
        headers={"Content-Type": "application/x-tar"},
    )
    assert answer.status == 403 and "may add at most 256 KB" in answer.message, answer.body
    assert student.call("GET", "/v1.41/images/grown/json").status == 404
    assert len(owned_objects(engine, student)["images"]) == 1


def test_a_commit_counts_every_port_the_engine_would_expose(student: StudentSession, curated_image: str) -> None:
    created = student.call("POST", "/v1.41/containers/create?name=src", {"Image": curated_image})
    assert created.status == 201, created.body
    refused = student.call("POST", f"/v1.41/commit?container=src&repo=grown&changes={quote('EXPOSE :1-65535')}")
    assert refused.status == 403 and "may add at most 256 KB" in refused.message, refused.body
    assert student.call("GET", "/v1.41/images/grown/json").status == 404


USUAL = {
    "an ARG's default": ("ARG PORT=8080\nEXPOSE $PORT\n", {}, ["8080/tcp"]),
    "a build argument": ("ARG PORT=8080\nEXPOSE $PORT\n", {"PORT": "9000"}, ["9000/tcp"]),
    "an old-style ENV": ("ENV PORT 8080\nEXPOSE ${{PORT}}/tcp\n", {}, ["8080/tcp"]),
    "an ARG before FROM": ("ARG PORT=8080\nFROM {base}\nARG PORT\nEXPOSE $PORT\n", {}, ["8080/tcp"]),
    "a later stage": (
        'FROM {base} AS build\nRUN true\nFROM {base}\nENV GREETING="hello world"\nARG PORT=8080\n'
        "EXPOSE $PORT 8000-8002\n",
        {},
        ["8000/tcp", "8001/tcp", "8002/tcp", "8080/tcp"],
    ),
}


@pytest.mark.parametrize(("lines", "build_args", "exposed"), USUAL.values(), ids=list(USUAL))
def test_expose_of_a_variable_builds_as_lessons_write_it(
    student: StudentSession, curated_image: str, lines: str, build_args: dict[str, str], exposed: list[str]
) -> None:
    dockerfile = lines.format(base=curated_image)
    if not dockerfile.startswith(("ARG PORT=8080\nFROM", "FROM")):
        dockerfile = f"FROM {curated_image}\n{dockerfile}"
    answer = student.call(
        "POST",
        "/v1.41/build?t=web&buildargs=" + quote(json.dumps(build_args)),
        body=dockerfile_context(dockerfile),
        headers={"Content-Type": "application/x-tar"},
    )
    assert answer.status == 200 and b"Successfully built" in answer.body, answer.body
    config = student.call("GET", "/v1.41/images/web/json").json()["Config"]
    assert sorted(config["ExposedPorts"]) == exposed, config


NUMBERS = {
    "a host port of a superscript digit": (
        "POST",
        "/v1.41/containers/create",
        {"Image": "{image}", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "\u00b2"}]}}},
        400,
    ),
    "a host port of 5000 digits": (
        "POST",
        "/v1.41/containers/create",
        {"Image": "{image}", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "9" * 5000}]}}},
        400,
    ),
    "a limit of a superscript digit": ("GET", "/v1.41/containers/json?limit=%C2%B2", None, 200),
    "a limit of 5000 digits": ("GET", "/v1.41/containers/json?limit=" + "9" * 5000, None, 200),
    "an API version of 5000 digits": ("GET", "/v" + "9" * 5000 + ".1/_ping", None, 400),
    "an API version of 5000 leading zeros": ("GET", "/v" + "0" * 5000 + "1.41/_ping", None, 200),
    "a port's bindings that are a number": (
        "POST",
        "/v1.41/containers/create",
        {"Image": "{image}", "HostConfig": {"PortBindings": {"80/tcp": 8080}}},
        400,
    ),
}


@pytest.mark.parametrize(("method", "path", "payload", "status"), NUMBERS.values(), ids=list(NUMBERS))
def test_values_the_gateway_cannot_read_are_answered(
    student: StudentSession,
    curated_image: str,
    engine: docker.APIClient,
    method: str,
    path: str,
    payload: Any,
    status: int,
) -> None:
    # Each was read with int() after a test that lets it through (str.isdigit, a Unicode \\d), or iterated, and
    # the request failed with no answer at all, the connection closed.
    if payload is not None:
        payload = json.loads(json.dumps(payload).replace("{image}", curated_image))
    answer = student.call(method, path, payload)
    assert answer.status == status, answer.body
    assert owned_objects(engine, student)["containers"] == []


def test_another_sessions_tags_and_removals_never_show_in_the_shared_image_list(
    student_factory: Any, curated_image: str
) -> None:
    # The engine's list is kept once for every session: one student's changes, raced against another's
    # listings, show in neither's answers but their own, and each of their own answers after a change has it.
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    built = alice.build(f"FROM {curated_image}\nLABEL lesson=race\n", tag="app")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    curated = curated_image.rpartition(":")[0]
    stop = threading.Event()
    seen_by_bob: list[set[str]] = []

    def bob_lists() -> None:
        while not stop.is_set():
            seen_by_bob.append(_tags(bob))

    lister = threading.Thread(target=bob_lists)
    lister.start()
    try:
        for number in range(8):
            name = f"race{number}:v1"
            assert alice.call("POST", f"/images/app/tag?repo=race{number}&tag=v1").status == 201
            assert name in _tags(alice)
            assert alice.call("DELETE", f"/images/{name}").status == 200
            assert name not in _tags(alice)
        assert alice.call("DELETE", "/images/app").status == 200
        assert "app:latest" not in _tags(alice)
        assert alice.call("GET", "/images/app/json").status == 404
    finally:
        stop.set()
        lister.join(timeout=60)
    assert seen_by_bob, "bob listed nothing"
    for tags in seen_by_bob:
        assert not {tag for tag in tags if tag.startswith(("race", "app:"))}, tags
        assert f"{curated}:latest" in tags, tags
    assert f"{curated}:latest" in _tags(alice) and f"{curated}:latest" in _tags(bob)


def _tags(student: StudentSession) -> set[str]:
    answer = student.call("GET", "/images/json")
    assert answer.status == 200, answer.body
    return {tag for image in answer.json() for tag in image["RepoTags"] or []}


def test_no_network_but_the_students_own_is_reached_by_any_name(student_factory: Any, curated_image: str) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    bobs = bob.run(curated_image, ["sleep", "60"], name="web")
    bobs_network = bob.call("GET", "/v1.41/networks/bridge").json()["Id"]
    for ref in (bob.network, bobs_network, bobs_network[:12], "host", "none"):
        answer = alice.call("GET", f"/v1.41/networks/{ref}")
        assert answer.status == 404 and answer.message == f"network {ref} not found", answer.body
    assert alice.call("GET", "/v1.41/networks/bridge").json()["Name"] == "bridge"
    for mode in (bob.network, bobs_network, "host", f"container:{bobs}", "container:web"):
        created = alice.call(
            "POST",
            "/v1.41/containers/create?name=probe",
            {"Image": curated_image, "HostConfig": {"NetworkMode": mode}},
        )
        assert created.status == 403 and "not available" in created.message, created.body
        endpoints: dict[str, Any] = {"EndpointsConfig": {mode: {}}}
        created = alice.call(
            "POST", "/v1.41/containers/create?name=probe", {"Image": curated_image, "NetworkingConfig": endpoints}
        )
        assert created.status == 403 and "not available" in created.message, created.body
    mine = alice.run(curated_image, ["sleep", "60"], name="mine")
    for path in (f"/networks/{bob.network}/connect", "/networks/bridge/connect", "/networks/bridge/disconnect"):
        answer = alice.call("POST", f"/v1.41{path}", {"Container": mine})
        assert answer.status == 403 and "not available" in answer.message, answer.body
    assert alice.call("GET", "/v1.41/containers/json").json()[0]["HostConfig"]["NetworkMode"] == "bridge"


def test_pipelined_requests_with_expect_and_upgrade_are_each_answered_once(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    body = json.dumps({"Image": curated_image, "Cmd": ["true"]}).encode()
    create = (
        b"POST /v1.41/containers/create?name=piped HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    upgraded = b"GET /v1.41/version HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
    last = b"GET /v1.41/containers/piped/json HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
    answer = student.raw(create + upgraded + last)
    statuses = re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", answer)
    assert statuses[-3:] == [b"201", b"200", b"200"] and b"101" not in statuses, answer[:2000]
    assert len(owned_objects(engine, student)["containers"]) == 1


class _Events:
    async def publish(self, session_id: int, kind: str, **fields: Any) -> None:
        pass


async def test_a_long_build_does_not_make_every_session_ask_the_engine_for_its_images(
    curated_image: str, tmp_path: Path
) -> None:
    # One student's build that runs for as long as they like (two at once) was a change under way for all that
    # time, and no session's lookup was answered from the shared list: each asked the engine for all of its images.
    counting = CountingEngine(settings.SANDBOX_DOCKER_URL.removeprefix("unix://"))
    images = ImageList(counting)
    following = asyncio.create_task(images.follow())
    session_id = 2_000_000_000 + secrets.randbelow(100_000_000)
    record = SessionRecord(
        session_id=session_id,
        owner_key=f"owner-{session_id}",
        expires_at=int(time.time()) + 600,
        memory_budget_mb=512,
        max_containers=8,
    )
    gateway = StudentGateway(
        record=record,
        config=gateway_config(),
        engine=counting,
        events=_Events(),  # type: ignore[arg-type]
        engine_images=images,
    )
    path = tmp_path / "docker.sock"
    server = await asyncio.start_unix_server(gateway.serve, path=str(path))
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(100):
            if images.following:
                break
            await asyncio.sleep(0.05)
        context = dockerfile_context(f"FROM {curated_image}\nRUN sleep 4\n")
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(
            b"POST /v1.41/build?t=slow HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(context)).encode() + b"\r\n\r\n" + context
        )
        await writer.drain()
        progress = b""
        async with asyncio.timeout(60):
            while b"Running in" not in progress:
                progress += await reader.read(65536)
        await images.entries()
        lists = counting.lists
        for _ in range(5):
            await images.entries()
        assert counting.lists == lists
        async with asyncio.timeout(60):
            while chunk := await reader.read(65536):
                progress += chunk
        assert b"Successfully tagged slow:latest" in progress, progress
        tags = {tag for entry in await images.entries() for tag in entry.get("RepoTags") or []}
        assert f"{gateway.namer.prefix}/slow:latest" in tags
    finally:
        if writer is not None:
            writer.close()
        server.close()
        await server.wait_closed()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await asyncio.to_thread(gateway_session_purge, session_id=session_id)


def test_inspect_shows_no_network_namespace_path_of_the_host(student: StudentSession, curated_image: str) -> None:
    # NetworkSettings.SandboxKey is the engine's path to the container's network namespace on the host.
    student.run(curated_image, ["sleep", "30"], name="web")
    answer = student.call("GET", "/v1.41/containers/web/json")
    assert answer.status == 200, answer.body
    assert answer.json()["NetworkSettings"]["SandboxKey"] == "", answer.json()["NetworkSettings"]
    assert b"/netns/" not in answer.body


REFUSED_ADDRESSES = {
    "[fe80::1%eth0]:8084:80": "Invalid ip address",
    "[::1]:8084:80": "not available",
    "10.0.0.1:8084:80": "not available",
    "0.0.0.0::80": "choose the port",
    "8084-8085:80": "invalid port",
    "1-4000:1-4000": "",
}


def test_published_addresses_bind_nothing_on_the_host_and_refusals_leave_nothing(
    student: StudentSession, curated_image: str, engine: docker.APIClient, workstation_factory: Any
) -> None:
    workstation = workstation_factory.for_session(student)
    for spec, said in REFUSED_ADDRESSES.items():
        code, output = workstation.docker(f"docker create -p '{spec}' {curated_image} true")
        assert code != 0 and said in output, (spec, output)
    assert owned_objects(engine, student)["containers"] == []
    for spec in ("[::]:8085:80", "127.0.0.1:8086:80", "0.0.0.0:8087:80", "8088:80"):
        code, output = workstation.docker(f"docker run -d -p '{spec}' {curated_image} sleep 30")
        assert code == 0, (spec, output)
    for container in owned_objects(engine, student)["containers"]:
        detail = engine.inspect_container(container["Id"])
        assert not detail["HostConfig"].get("PortBindings") and not detail["NetworkSettings"].get("Ports"), detail
    code, output = workstation.docker("docker ps --format '{{.Ports}}' | sort")
    assert code == 0 and output.split("\n")[:4] == [
        "0.0.0.0:8087->80/tcp",
        "0.0.0.0:8088->80/tcp, :::8088->80/tcp",
        "127.0.0.1:8086->80/tcp",
        ":::8085->80/tcp",
    ], output
