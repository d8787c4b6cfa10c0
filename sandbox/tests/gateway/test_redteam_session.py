"""One student against the gateway itself and against the sandbox's budget: nothing a student sends may stall
the gateway for the others, raise the budget by racing it, or show where the engine keeps things on the host."""

import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import pytest
import redis
from django.conf import settings

from sandbox.gateway.registry import SessionRecord
from sandbox.gateway.server import REFUSALS_MAX
from sandbox.gateway.session import MAX_CONNECTIONS

from .conftest import BASE_DIR, StudentSession, _wait_for_socket, owned_objects

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _list(student: StudentSession, **filters: list[str]) -> Any:
    return student.call("GET", "/v1.41/containers/json?all=1&filters=" + quote(json.dumps(filters)))


def test_name_filters_match_as_docker_does_without_backtracking(student_factory: Any, curated_image: str) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    alice.call("POST", "/v1.41/containers/create?name=" + "a" * 40, {"Image": curated_image, "Cmd": ["true"]})
    alice.call("POST", "/v1.41/containers/create?name=web", {"Image": curated_image, "Cmd": ["true"]})
    for pattern, names in (("web", ["/web"]), ("^/w.b$", ["/web"]), ("^/a+$", ["/" + "a" * 40]), ("x*", None)):
        listed = sorted(c["Names"][0] for c in _list(alice, name=[pattern]).json())
        assert listed == (names or sorted(["/web", "/" + "a" * 40])), pattern

    answers: list[Any] = []
    attack = threading.Thread(target=lambda: answers.append(_list(alice, name=["^/(a+)+b"])))
    attack.start()
    started = time.monotonic()
    assert bob.call("GET", "/_ping").status == 200
    assert time.monotonic() - started < 2
    attack.join(timeout=30)
    assert answers and answers[0].status == 200 and answers[0].json() == []
    answer = _list(alice, name=["(unclosed"])
    assert answer.status == 400 and "error parsing regexp" in answer.message
    # Compiling is what costs: an expression that unfolds too far, or too many of them, is refused at once.
    started = time.monotonic()
    assert _list(alice, name=[r"[\pL\pN]{400}"]).status == 400
    many = _list(alice, name=[f"^/web{n}" for n in range(200)])
    assert many.status == 400 and "at most 8 name filters" in many.message
    assert time.monotonic() - started < 2


def test_concurrent_creates_cannot_pass_the_budget_together(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    student = student_factory(memory_budget_mb=128, max_containers=2)

    def create(_index: int) -> int:
        return student.call(
            "POST", "/v1.41/containers/create", {"Image": curated_image, "HostConfig": {"Memory": 60 * 1024**2}}
        ).status

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(create, range(6)))
    assert statuses.count(201) == 2, statuses
    assert len(owned_objects(engine, student)["containers"]) == 2


def test_one_student_cannot_hold_every_connection(student_factory: Any) -> None:
    greedy: StudentSession = student_factory()
    other: StudentSession = student_factory()
    held: list[socket.socket] = []
    try:
        held += _held_open(greedy.socket, 200)
        refused = 200 - MAX_CONNECTIONS
        # Past the refusals it answers, the gateway closes at once: refusing holds no more of its files.
        at_once = _closed_by_the_gateway(held, count=refused - REFUSALS_MAX, within=0.5)
        assert len(at_once) >= refused - REFUSALS_MAX
        closed = at_once + _closed_by_the_gateway(
            [sock for sock in held if sock not in at_once], count=refused - len(at_once)
        )
        assert len(closed) == refused
        # A whole request past the cap is told why.
        answer = greedy.call("GET", "/_ping")
        assert answer.status == 503 and "connections open already" in answer.message
        assert other.call("GET", "/_ping").status == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while greedy.call("GET", "/_ping").status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert greedy.call("GET", "/_ping").status == 200


def test_healthchecks_cannot_run_the_engine_flat_out(student: StudentSession, curated_image: str) -> None:
    fast = {"Test": ["CMD", "true"], "Interval": 1_000_000}
    answer = student.call("POST", "/v1.41/containers/create", {"Image": curated_image, "Healthcheck": fast})
    assert answer.status == 403 and "--health-interval" in answer.message
    sneaky = {"Test": ["CMD", "true"], "interval": 1_000_000}
    answer = student.call("POST", "/v1.41/containers/create", {"Image": curated_image, "Healthcheck": sneaky})
    assert answer.status == 403
    normal = {"Test": ["CMD", "true"], "Interval": 5_000_000_000, "Retries": 3}
    answer = student.call("POST", "/v1.41/containers/create", {"Image": curated_image, "Healthcheck": normal})
    assert answer.status == 201, answer.body


def test_inspect_shows_no_host_paths(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    root = engine.info()["DockerRootDir"].encode()
    student.run(curated_image, ["sleep", "30"], name="web", HostConfig={"Binds": ["data:/data"]})
    answers = [
        student.call("GET", "/v1.41/containers/web/json"),
        student.call("GET", f"/v1.41/images/{curated_image}/json"),
        student.call("GET", "/v1.41/volumes/data"),
        student.call("GET", "/v1.41/volumes"),
    ]
    for answer in answers:
        assert answer.status == 200, answer.body
        assert root not in answer.body and b"overlay2/" not in answer.body, answer.body


def test_network_inspect_shows_only_the_students_containers(
    student: StudentSession, curated_image: str, workstation_factory: Any
) -> None:
    workstation = workstation_factory.for_session(student)
    student.run(curated_image, ["sleep", "30"], name="web")
    for path in (f"/v1.41/networks/{student.network}", "/v1.41/networks"):
        answer = student.call("GET", path)
        network = answer.json() if path.endswith(student.network) else answer.json()[0]
        names = [c["Name"] for c in network["Containers"].values()]
        assert names == ["web"], names
        assert workstation.container_id not in answer.body.decode()


@pytest.mark.parametrize("query", ["filters=%7Bnot-json", "filters=%5B1%5D"])
def test_malformed_filters_are_answered(student: StudentSession, query: str) -> None:
    answer = student.call("GET", f"/v1.41/containers/json?{query}")
    assert answer.status == 400, answer.body
    built = student.call("POST", "/v1.41/build?labels=%7Bbad", body=b"", headers={"Content-Type": "x"})
    assert built.status == 400 and "invalid labels" in built.message


def _held_open(path: Path, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n")  # never finishes its head
        held.append(sock)
    return held


def _closed_by_the_gateway(socks: list[socket.socket], *, count: int, within: float = 5) -> list[socket.socket]:
    """The sockets the gateway closes, once `count` of them are closed or the time is up."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + within
    while len(closed) < count and time.monotonic() < deadline:
        open_ones = [sock for sock in socks if sock not in closed]
        readable, _, _ = select.select(open_ones, [], [], max(deadline - time.monotonic(), 0))
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data or data.startswith(b"HTTP/1.1 503"):
                closed.append(sock)
    return closed


def test_all_students_together_cannot_use_up_the_gateways_open_files() -> None:
    """A gateway allowed few open files serves connections up to its share of them, across every session,
    and refuses the rest at once rather than failing to accept anything."""
    namespace = f"{settings.SANDBOX_NAMESPACE}fd"
    directory = Path(settings.GATEWAY_DIR).parent / namespace
    env = {**os.environ, "LAYERCAKE_SANDBOX_NAMESPACE": namespace, "LAYERCAKE_GATEWAY_DIR": str(directory)}
    env["DJANGO_SETTINGS_MODULE"] = "tutorial.settings.test"
    client = redis.Redis.from_url(settings.REDIS_URL)
    sessions_key = f"{namespace}:gateway:sessions"
    ids = [2_100_000_000 + n for n in range(2)]
    for session_id in ids:
        record = SessionRecord(session_id, "owner", int(time.time()) + 600, 64, 1)
        client.hset(sessions_key, str(session_id), record.dumps())

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (210, 210))

    gateway = subprocess.Popen(
        [sys.executable, "manage.py", "gateway"],
        cwd=BASE_DIR,
        env=env,
        preexec_fn=few_files,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    held: list[socket.socket] = []
    try:
        first, second = (directory / str(session_id) / "docker.sock" for session_id in ids)
        _wait_for_socket(first)
        _wait_for_socket(second)
        # 210 files allow 70 connections: one session holds its own most (64), the other what is left.
        held += _held_open(first, MAX_CONNECTIONS)
        held += _held_open(second, 70 - MAX_CONNECTIONS)
        assert _closed_by_the_gateway(held, count=1, within=1.5) == []
        late = _held_open(second, 1)
        held += late
        assert _closed_by_the_gateway(late, count=1) == late
        for sock in held[:10]:
            sock.close()
        deadline = time.monotonic() + 5
        answer = b""
        while not answer.startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(second))
                sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
                answer = sock.recv(64)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for sock in held:
            sock.close()
        gateway.terminate()
        gateway.wait(timeout=10)
        client.delete(sessions_key)
        client.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_builds_wait_for_memory_only_while_their_context_is_read(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    """The gateway holds a few build contexts in memory at once; once a context is with the engine, its build
    no longer holds a place, so a room of students building at once all build together."""
    from sandbox.gateway.session import MAX_CONCURRENT_BUILDS, MAX_GATEWAY_BUILDS

    students = [student_factory() for _ in range(3)]
    builds = [s for s in students for _ in range(MAX_CONCURRENT_BUILDS)]
    assert len(builds) > MAX_GATEWAY_BUILDS
    image_id = engine.inspect_image(curated_image)["Id"]

    def build(args: tuple[int, StudentSession]) -> int:
        index, student = args
        return student.build(f"FROM {curated_image}\nRUN sleep 4 && echo {index}\n", tag=f"slow{index}").status

    seen = 0
    with ThreadPoolExecutor(max_workers=len(builds)) as pool:
        running = pool.map(build, enumerate(builds))
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and seen < len(builds):
            # A RUN step's container carries its image's labels, but none of a sandbox role.
            steps = [
                c
                for c in engine.containers(filters={"ancestor": image_id})
                if "layercake.role" not in (c.get("Labels") or {})
            ]
            seen = max(seen, len(steps))
            time.sleep(0.2)
        statuses = list(running)
    assert statuses == [200] * len(builds)
    assert seen == len(builds)


def test_contexts_that_crawl_in_hold_one_place_a_sandbox(student_factory: Any, curated_image: str) -> None:
    """The gateway reads a few build contexts at once, and a sandbox one of them: builds whose contexts never
    finish arriving, as many as two sandboxes may start, leave the places another student's build needs."""
    from sandbox.gateway.session import BUILD_CONTEXT_SECONDS, MAX_CONCURRENT_BUILDS, MAX_GATEWAY_BUILDS

    crawlers = [student_factory() for _ in range(MAX_GATEWAY_BUILDS // MAX_CONCURRENT_BUILDS)]
    held: list[socket.socket] = []
    try:
        for crawler in crawlers:
            for _ in range(MAX_CONCURRENT_BUILDS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(crawler.socket))
                sock.sendall(
                    b"POST /v1.41/build?t=crawl HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n1\r\n\0\r\n"
                )
                held.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        answer = student_factory().build(f"FROM {curated_image}\nLABEL quick=1\n", tag="quick")
        assert answer.status == 200 and b"Successfully tagged quick:latest" in answer.body, answer.body
        assert time.monotonic() - started < BUILD_CONTEXT_SECONDS / 2, "the build waited for a crawling one"
        # Each crawling build is still being read, or waiting to be: none was answered.
        assert select.select(held, [], [], 0)[0] == []
    finally:
        for sock in held:
            sock.close()
