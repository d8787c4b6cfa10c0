"""Third red-team pass: what one student could do to every other student's docker, or to what is not theirs."""

import json
import re
import socket
import time
from typing import Any
from urllib.parse import quote

import docker.errors
import pytest

from sandbox.gateway.policy import LABELS_MAX, MAX_CONTAINER_VOLUMES, MAX_PENDING_EXECS, SANDBOX_LABELS_MAX
from sandbox.gateway.session import MAX_CONNECTIONS

from .conftest import StudentSession, dockerfile_context, owned_objects

TAR = {"Content-Type": "application/x-tar"}
# A container's limit on its processes, under cgroup v1 or v2.
PIDS_MAX = "/sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max"

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _labels(size: int, key: str = "k") -> dict[str, str]:
    """Labels of about `size` bytes, in values of 1000."""
    return {f"{key}{index}": "x" * 1000 for index in range(size // 1000 + 1)}


def test_labels_are_bounded_for_the_list_every_student_reads(
    student: StudentSession, curated_image: str, engine: Any
) -> None:
    # The engine lists every image with its labels, and every student's docker reads that list whole: a few
    # megabytes of labels per image (a create body may be 1 MB; a commit makes the container's labels an
    # image's) would make it answer too much, or too slowly, for everyone.
    huge = student.call(
        "POST", "/v1.41/containers/create?name=huge", {"Image": curated_image, "Labels": _labels(LABELS_MAX)}
    )
    assert huge.status == 403 and "labels" in huge.message, huge.body
    assert owned_objects(engine, student)["containers"] == []

    half = _labels(LABELS_MAX * 3 // 4)
    created = student.call("POST", "/v1.41/containers/create?name=half", {"Image": curated_image, "Labels": half})
    assert created.status == 201, created.body
    change = quote("LABEL more=" + "y" * (LABELS_MAX // 2))
    refused = student.call("POST", f"/v1.41/commit?container=half&repo=more&changes={change}")
    assert refused.status == 403 and "labels" in refused.message, refused.body
    committed = student.call("POST", "/v1.41/commit?container=half&repo=half")
    assert committed.status == 201, committed.body
    # What it carries now counts when it is built on or run again.
    on_top = student.build(f"FROM half\nLABEL more={'y' * (LABELS_MAX // 2)}\n", tag="ontop")
    assert on_top.status == 403 and "labels" in on_top.message, on_top.body
    rerun = student.call(
        "POST", "/v1.41/containers/create?name=rerun", {"Image": "half", "Labels": _labels(LABELS_MAX // 2, "z")}
    )
    assert rerun.status == 403, rerun.body
    built = student.build(f"FROM {curated_image}\nLABEL big={'y' * LABELS_MAX}\n", tag="big")
    assert built.status == 403 and "labels" in built.message, built.body
    assert len(owned_objects(engine, student)["images"]) == 1

    # Small labels, as lessons use them, are as docker has them.
    small = student.build(f'FROM {curated_image}\nLABEL lesson="labels" version=1\n', tag="small")
    assert small.status == 200 and b"Successfully" in small.body, small.body
    shown = student.call("GET", "/v1.41/images/small/json").json()["Config"]["Labels"]
    assert shown["lesson"] == "labels" and shown["version"] == "1"


def test_one_sandboxs_images_carry_a_bounded_amount_of_labels(student: StudentSession, curated_image: str) -> None:
    labels = _labels(LABELS_MAX * 3 // 4)
    created = student.call("POST", "/v1.41/containers/create?name=src", {"Image": curated_image, "Labels": labels})
    assert created.status == 201, created.body
    each = sum(len(k) + len(v) for k, v in labels.items())
    for index in range(SANDBOX_LABELS_MAX // each):
        committed = student.call("POST", f"/v1.41/commit?container=src&repo=copy{index}")
        assert committed.status == 201, committed.body
    refused = student.call("POST", "/v1.41/commit?container=src&repo=onetoomany")
    assert refused.status == 403 and "in all" in refused.message, refused.body
    removed = student.call("DELETE", "/v1.41/images/copy0")
    assert removed.status == 200, removed.body
    assert student.call("POST", "/v1.41/commit?container=src&repo=again").status == 201


def _build_output(answer: Any) -> str:
    return "".join(json.loads(line).get("stream", "") for line in answer.body.splitlines() if line.strip())


def test_a_build_step_runs_as_few_processes_as_a_container(
    student_factory: Any, curated_image: str, engine: Any
) -> None:
    # The builder cannot limit the processes of a step, which runs whatever the student wrote: one RUN could
    # fork until the host has no process IDs left for anyone (the engine and the site included).
    student: StudentSession = student_factory()
    other: StudentSession = student_factory()
    victim = other.run(curated_image, ["sleep", "600"], HostConfig={"PidsLimit": 64, "NetworkMode": "none"})
    script = (
        f"echo ' ---> Running in {victim[:12]}'; sleep 2; "
        f"echo limit=$(cat {PIDS_MAX}); "
        "i=0; while [ $i -lt 300 ]; do sleep 5 & i=$((i+1)); done; echo started-$((150*2))"
    )
    answer = student.build(f"FROM {curated_image}\nRUN {script}\n")
    assert answer.status == 200, answer.body
    text = _build_output(answer)
    assert "limit=128" in text and "started-300" not in text, text
    assert b"errorDetail" in answer.body, answer.body
    # Words a step prints are not the builder's: another sandbox's container keeps its own limit.
    assert engine.inspect_container(victim)["HostConfig"]["PidsLimit"] == 64


def test_a_quiet_build_is_not_kept_by_the_engine(student: StudentSession, curated_image: str) -> None:
    # The engine keeps all of a quiet build's progress in its own memory: a RUN that prints without end would
    # grow it for everyone. The gateway asks for the progress and shows what docker build -q shows.
    path = "/v1.41/build?q=1&t=quiet"
    dockerfile = f"FROM {curated_image}\nRUN echo made-quietly\n"
    answer = student.call("POST", path, body=dockerfile_context(dockerfile), headers=TAR)
    assert answer.status == 200, answer.body
    lines = [json.loads(line) for line in answer.body.splitlines() if line.strip()]
    image_id = student.call("GET", "/v1.41/images/quiet/json").json()["Id"]
    assert lines == [{"stream": image_id + "\n"}], lines
    # A quiet build's steps are limited as any other's, and what they said is shown once one fails.
    failing = f"FROM {curated_image}\nRUN sleep 2; echo limit=$(cat {PIDS_MAX}); false\n"
    failed = student.call("POST", path, body=dockerfile_context(failing), headers=TAR)
    assert b"errorDetail" in failed.body, failed.body
    assert "limit=128" in _build_output(failed), failed.body


def test_exec_instances_cannot_fill_the_engines_memory(student: StudentSession, curated_image: str) -> None:
    # The engine keeps every exec instance, with its command and environment, in its own memory until it has
    # finished (a never started one, until its container goes): sixty 900 KB commands made in under a second
    # were over 100 MB of the engine's memory, which all students share.
    student.run(curated_image, ["sleep", "600"], name="app")
    for body in ({"Cmd": ["true", "x" * 900_000]}, {"Cmd": ["true"], "Env": ["X=" + "x" * 100_000]}):
        refused = student.call("POST", "/v1.41/containers/app/exec", body)
        assert refused.status == 403 and "KB" in refused.message, refused.body
    assert not student.call("GET", "/v1.41/containers/app/json").json()["ExecIDs"]

    made = [
        student.call("POST", "/v1.41/containers/app/exec", {"Cmd": ["true"]}).json()["Id"]
        for _ in range(MAX_PENDING_EXECS)
    ]
    refused = student.call("POST", "/v1.41/containers/app/exec", {"Cmd": ["true"]})
    assert refused.status == 403 and "have not finished" in refused.message, refused.body
    assert len(student.call("GET", "/v1.41/containers/app/json").json()["ExecIDs"]) == MAX_PENDING_EXECS
    # One that has run makes room, and docker exec is as docker has it.
    assert student.call("POST", f"/v1.41/exec/{made[0]}/start", {"Detach": True}).status == 200
    deadline = time.monotonic() + 10
    while student.call("GET", f"/v1.41/exec/{made[0]}/json").json()["Running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    again = student.call("POST", "/v1.41/containers/app/exec", {"Cmd": ["echo", "hello"], "AttachStdout": True})
    assert again.status == 201, again.body


def test_images_cannot_weigh_down_every_students_image_list(
    student: StudentSession, curated_image: str, engine: Any
) -> None:
    # The engine decodes every image's configuration and history, intermediate images' too, for every
    # student's docker images: each step of a build leaves an image holding all that came before it, so three
    # builds of 48 steps of 5 KB made each such call a second slower for everyone.
    heavy = "".join(f"ENV V{index}={'x' * 25_000}\n" for index in range(10))
    refused = student.build(f"FROM {curated_image}\n{heavy}", tag="heavy")
    assert refused.status == 403 and "weigh" in refused.message, refused.body
    padded = f"FROM {curated_image}\n" + "".join(f"RUN true # {'x' * 2_000}\n" for _ in range(60))
    refused = student.build(padded, tag="padded")
    assert refused.status == 403 and "weigh" in refused.message, refused.body
    assert owned_objects(engine, student)["images"] == []

    # Commits count too, and so does what the sandbox holds already.
    env = [f"V{index}={'x' * 1000}" for index in range(200)]
    created = student.call(
        "POST", "/v1.41/containers/create?name=src", {"Image": curated_image, "Env": env, "Cmd": ["true"]}
    )
    assert created.status == 201, created.body
    made = []
    for index in range(20):
        committed = student.call("POST", f"/v1.41/commit?container=src&repo=copy{index}")
        if committed.status != 201:
            break
        made.append(index)
    assert committed.status == 403 and "in all" in committed.message, committed.body
    assert 3 <= len(made) < 20
    assert student.call("DELETE", "/v1.41/images/copy0").status == 200
    assert student.call("POST", "/v1.41/commit?container=src&repo=again").status == 201
    # What lessons build is far from it.
    built = student.build(f"FROM {curated_image}\nENV APP=1\nRUN echo hi > /hi\nCMD cat /hi\n", tag="app")
    assert built.status == 200 and b"Successfully" in built.body, built.body


def _step_images(text: str) -> list[str]:
    return re.findall(r"^ ---> ([0-9a-f]{12})$", text, flags=re.MULTILINE)


def _exists(engine: Any, image: str) -> bool:
    try:
        engine.inspect_image(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _gone(engine: Any, images: list[str], within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while any(_exists(engine, image) for image in images):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_failed_or_interrupted_build_leaves_no_images(
    student: StudentSession, curated_image: str, engine: Any
) -> None:
    # The steps of a build that fails stay on the engine as images no one can name or remove (the gateway
    # labels only the last), each holding all that came before it, read by every student's docker images.
    answer = student.build(f"FROM {curated_image}\nENV STEP=one\nENV STEP=two\nRUN false\n", tag="fails")
    assert b"errorDetail" in answer.body, answer.body
    steps = _step_images(_build_output(answer))
    assert len(steps) == 3, answer.body
    assert _exists(engine, steps[0])
    assert _gone(engine, steps[1:]), steps

    # Interrupted (the student's docker build gone), the build is stopped a while later and cleaned up too.
    dockerfile = f"FROM {curated_image}\nENV STEP=three\nRUN sleep 600\n"
    body = dockerfile_context(dockerfile)
    head = (
        f"POST /v1.41/build?t=gone HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(student.socket))
        sock.sendall(head + body)
        seen = b""
        while b"Running in" not in seen.partition(b"RUN sleep 600")[2]:
            chunk = sock.recv(65536)
            assert chunk, seen
            seen += chunk
    step = _step_images(seen.decode().replace("\\n", "\n").replace('{"stream": "', ""))[-1]
    assert _exists(engine, step) and not engine.inspect_image(step)["RepoTags"], step
    assert _gone(engine, [step], within=40)


def test_builds_keep_to_the_sandboxs_memory_budget(student_factory: Any, curated_image: str) -> None:
    # A build's steps could each use a whole container's memory beside the sandbox's containers: with two
    # builds at once, a student used three times the memory the sandbox is given.
    student: StudentSession = student_factory(memory_budget_mb=64, max_containers=2)
    student.run(curated_image, ["sleep", "600"], name="big", HostConfig={"Memory": 40 * 1024 * 1024})
    probe = "RUN cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"
    built = student.build(f"FROM {curated_image}\n{probe}\n")
    assert built.status == 200 and b"Successfully" in built.body, built.body
    assert str(24 * 1024 * 1024) in _build_output(built), built.body
    more = student.call("POST", "/v1.41/containers/big/update", {"Memory": 62 * 1024 * 1024})
    assert more.status == 200, more.body
    refused = student.build(f"FROM {curated_image}\nRUN true\n")
    assert refused.status == 403 and "memory" in refused.message, refused.body


def test_a_stream_the_student_left_holds_none_of_their_connections(
    student: StudentSession, curated_image: str
) -> None:
    # docker logs -f (or events, stats) of something quiet, interrupted: the gateway only noticed the student
    # had gone once the engine said something, so a few dozen interruptions locked the student out.
    student.run(curated_image, ["sleep", "600"], name="quiet")
    request = b"GET /v1.41/containers/quiet/logs?follow=1&stdout=1 HTTP/1.1\r\nHost: docker\r\n\r\n"
    for _ in range(MAX_CONNECTIONS + 4):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(student.socket))
            sock.sendall(request)
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 10
    answer = student.call("GET", "/v1.41/_ping")
    while answer.status != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = student.call("GET", "/v1.41/_ping")
    assert answer.status == 200, answer.body


def test_a_container_has_a_bounded_number_of_volumes(
    student: StudentSession, curated_image: str, engine: Any
) -> None:
    # Each path of a create's Volumes (or of its image's VOLUME) is an anonymous volume the engine makes and
    # lists for everyone; one create body could name tens of thousands.
    many: dict[str, Any] = {f"/v{index}": {} for index in range(2000)}
    refused = student.call("POST", "/v1.41/containers/create", {"Image": curated_image, "Volumes": many})
    assert refused.status == 403 and "volumes" in refused.message, refused.body
    volumes = " ".join(f"/v{index}" for index in range(MAX_CONTAINER_VOLUMES + 1))
    built = student.build(f"FROM {curated_image}\nVOLUME {volumes}\n", tag="volumes")
    assert built.status == 200 and b"Successfully" in built.body, built.body
    refused = student.call("POST", "/v1.41/containers/create", {"Image": "volumes"})
    assert refused.status == 403 and "volumes" in refused.message, refused.body
    assert owned_objects(engine, student)["containers"] == []
    # A few, as lessons have them, are as docker has them.
    made = student.call(
        "POST",
        "/v1.41/containers/create",
        {"Image": curated_image, "Volumes": {"/cache": {}}, "HostConfig": {"Binds": ["data:/data"]}},
    )
    assert made.status == 201, made.body
