"""The disk budget: what a sandbox keeps on the engine's disk (its containers' writable layers, its volumes,
its own images' layers) is measured, and a student who writes past it is stopped and can make nothing more
until they remove some, while every other student goes on."""

import io
import json
import secrets
import tarfile
import threading
import time
from typing import Any

import docker
import pytest
from django.test import override_settings

from sandbox.gateway.client import gateway_session_open
from sandbox.gateway.disk import CHECK_SECONDS, image_shares
from tests.gateway_process import GatewayProcess

from .conftest import StudentSession, _wait_for_socket, owned_objects

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

MB = 1024 * 1024


def _create(student: StudentSession, image: str, cmd: list[str], **fields: Any) -> Any:
    return student.call("POST", "/v1.41/containers/create", {"Image": image, "Cmd": cmd, **fields})


def _wait_stopped(engine: docker.APIClient, container_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state: dict[str, Any] = engine.inspect_container(container_id)["State"]
        if not state["Running"]:
            return state
        time.sleep(0.2)
    raise AssertionError(f"container {container_id[:12]} still runs {timeout}s on")


def _filled(student: StudentSession, engine: docker.APIClient, image: str, megabytes: int) -> str:
    """A container that wrote `megabytes` to its writable layer, and stopped."""
    container = student.run(image, ["dd", "if=/dev/zero", "of=/fill", "bs=1M", f"count={megabytes}"])
    assert _wait_stopped(engine, container)["ExitCode"] == 0
    return container


def _wait_refused(student: StudentSession, image: str, timeout: float = 20) -> str:
    """The refusal of the sandbox's next container, once the disk watch has seen what it keeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = _create(student, image, ["true"])
        if answer.status == 403:
            return str(answer.message)
        assert answer.status == 201, answer.body
        student.call("DELETE", f"/v1.41/containers/{answer.json()['Id']}")
        time.sleep(0.5)
    raise AssertionError("the sandbox went on making containers past its disk budget")


def test_layers_count_once_for_the_sandbox_that_alone_holds_them() -> None:
    namespace = "lc"

    def image(image_id: str, parent: str, size: int, *, session: str = "", tags: bool = True) -> dict[str, Any]:
        labels = {"layercake.namespace": namespace, "layercake.session": session} if session else {}
        return {
            "Id": image_id,
            "ParentId": parent,
            "Size": size * MB,
            "Labels": labels,
            "RepoTags": [f"{image_id}:latest"] if tags else ["<none>:<none>"],
        }

    images = [
        image("curated", "", 2),
        # A build's step below the image it made: no label of the student's, in no one else's stack.
        image("step", "curated", 14, tags=False),
        image("app", "step", 26, session="7"),
        image("app2", "app", 27, session="7"),
        image("dangling", "curated", 5, session="7", tags=False),
        image("theirs", "curated", 10, session="8"),
        # Another site's student on the same engine.
        {**image("elsewhere", "app", 30), "Labels": {"layercake.namespace": "other", "layercake.session": "7"}},
    ]
    shares = image_shares(images, namespace=namespace)
    # app's 12 MB and the step's 12 MB are held by the other site's image too: they are not session 7's alone.
    assert shares == {7: (27 - 26) * MB + (5 - 2) * MB, 8: (10 - 2) * MB}
    assert image_shares(images[:-1], namespace=namespace)[7] == (14 - 2 + 26 - 14 + 27 - 26 + 5 - 2) * MB


def test_a_container_writing_past_the_disk_budget_is_stopped_and_nothing_more_is_made_until_it_goes(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    bob = student_factory(disk_budget_mb=16)
    quiet = alice.run(curated_image, ["sleep", "600"])
    writer = alice.run(curated_image, ["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=24 && sleep 600"])
    state = _wait_stopped(engine, writer)
    assert state["ExitCode"] == 137
    # Only what wrote is stopped.
    assert engine.inspect_container(quiet)["State"]["Running"]

    message = _wait_refused(alice, curated_image)
    assert "more than the 16 MB it may" in message and "MB in its containers" in message, message
    assert "what was writing was stopped" in message and "docker rm" in message, message
    for refused in (
        alice.call("POST", f"/v1.41/containers/{writer}/start"),
        alice.call("POST", f"/v1.41/commit?container={quiet}&repo=snapshot"),
        alice.call("POST", "/v1.41/volumes/create", {"Name": "more"}),
        alice.build(f"FROM {curated_image}\nRUN true\n", tag="more"),
    ):
        assert refused.status == 403 and "more than the 16 MB" in refused.message, refused.body
    assert not [v for v in owned_objects(engine, alice)["volumes"] if v["Name"].endswith("more")]
    # What a student can still do: look, and remove.
    assert alice.call("GET", "/v1.41/containers/json?all=1").status == 200

    # Another sandbox on the same engine goes on.
    assert _create(bob, curated_image, ["true"]).status == 201

    assert alice.call("DELETE", f"/v1.41/containers/{writer}").status == 204
    again = _create(alice, curated_image, ["true"])
    assert again.status == 201, again.body


def test_a_volume_past_the_disk_budget_holds_the_sandbox_until_the_volume_goes(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    assert alice.call("POST", "/v1.41/volumes/create", {"Name": "data"}).status == 201
    writer = alice.run(
        curated_image,
        ["sh", "-c", "dd if=/dev/zero of=/data/fill bs=1M count=24 && sleep 600"],
        HostConfig={"Binds": ["data:/data"]},
    )
    assert _wait_stopped(engine, writer)["ExitCode"] == 137
    assert alice.call("DELETE", f"/v1.41/containers/{writer}").status == 204
    # The container is gone; what it wrote is not.
    message = _wait_refused(alice, curated_image)
    assert "MB in its volumes" in message and "0.0 MB in its containers" in message, message
    assert alice.call("DELETE", "/v1.41/volumes/data").status == 204
    assert _create(alice, curated_image, ["true"]).status == 201


def test_what_a_container_gone_at_once_wrote_to_a_volume_counts(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    assert alice.call("POST", "/v1.41/volumes/create", {"Name": "data"}).status == 201
    time.sleep(2 * CHECK_SECONDS)
    # docker run --rm: it writes, stops and is removed between two looks, and no look finds it.
    alice.run(
        curated_image,
        ["dd", "if=/dev/zero", "of=/data/fill", "bs=1M", "count=24"],
        HostConfig={"Binds": ["data:/data"], "AutoRemove": True},
    )
    message = _wait_refused(alice, curated_image, timeout=30)
    assert "MB in its volumes" in message and "0.0 MB in its containers" in message, message


@pytest.mark.parametrize(
    "mount",
    [
        {"Volumes": {"/data": {}}},
        {"HostConfig": {"Mounts": [{"Type": "volume", "Source": "", "Target": "/data"}]}},
    ],
    ids=["-v /data", "--mount type=volume"],
)
def test_an_anonymous_volume_counts_for_the_sandbox_whose_container_mounts_it(
    student_factory: Any, curated_image: str, engine: docker.APIClient, mount: dict[str, Any]
) -> None:
    alice = student_factory(disk_budget_mb=16)
    fill = "dd if=/dev/zero of=/data/fill bs=1M count=24 && sleep 600"
    writer = alice.run(curated_image, ["sh", "-c", fill], **mount)
    assert _wait_stopped(engine, writer)["ExitCode"] == 137
    assert "MB in its volumes" in _wait_refused(alice, curated_image)
    # The volume goes with its container.
    assert alice.call("DELETE", f"/v1.41/containers/{writer}").status == 204
    assert _create(alice, curated_image, ["true"]).status == 201


def test_a_build_step_writing_past_the_disk_budget_fails_the_build_and_leaves_nothing(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    started = time.monotonic()
    answer = alice.build(
        f"FROM {curated_image}\nRUN dd if=/dev/zero of=/fill bs=1M count=24 && sleep 600\n", tag="filler"
    )
    assert time.monotonic() - started < 30
    lines = [json.loads(line) for line in answer.body.splitlines() if line.strip()]
    errors = [line["error"] for line in lines if "error" in line]
    assert errors and "returned a non-zero code: 137" in errors[-1], lines[-3:]
    assert not owned_objects(engine, alice)["images"]
    # The step's container went with the build, and with it what it wrote.
    deadline = time.monotonic() + 3 * CHECK_SECONDS + 5
    while time.monotonic() < deadline:
        answer = _create(alice, curated_image, ["true"])
        if answer.status == 201:
            break
        time.sleep(0.5)
    assert answer.status == 201, answer.body


def test_a_container_that_restarts_as_it_writes_restarts_no_more(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    # Each run adds 6 MB to the same writable layer, and fails, for its restart policy to start it again.
    writer = alice.run(
        curated_image,
        ["sh", "-c", "dd if=/dev/zero of=/fill$RANDOM bs=1M count=6; sleep 2; exit 1"],
        HostConfig={"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 5}},
    )
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        detail = engine.inspect_container(writer)
        if not detail["State"]["Running"] and not detail["State"]["Restarting"]:
            break
        time.sleep(0.2)
    time.sleep(2 * CHECK_SECONDS)
    detail = engine.inspect_container(writer)
    assert not detail["State"]["Running"] and not detail["State"]["Restarting"], detail["State"]
    # Stopped before its policy ran out.
    assert detail["RestartCount"] < 5, detail["RestartCount"]
    assert "was stopped" in _wait_refused(alice, curated_image)


def test_the_steps_of_a_build_under_way_count_for_its_sandbox(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    # Steps that copy what the context holds: no step's container ever runs holding more than the budget.
    dockerfile = f"FROM {curated_image}\nCOPY a /a\nCOPY b /b\nRUN sleep 20\n"
    files = {"Dockerfile": dockerfile.encode(), **{name: secrets.token_bytes(10 * MB) for name in "ab"}}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    context = buffer.getvalue()

    def build() -> None:
        answers.append(
            alice.call("POST", "/v1.41/build?t=big", body=context, headers={"Content-Type": "application/x-tar"})
        )

    answers: list[Any] = []
    builder = threading.Thread(target=build)
    builder.start()
    try:
        # The build has named no image yet: its steps' images hold the 20 MB.
        message = _wait_refused(alice, curated_image, timeout=18)
        assert "MB in its images" in message and "0.0 MB in its containers" in message, message
    finally:
        builder.join(60)
    assert answers and b'"error"' not in answers[0].body, answers
    assert "MB in its images" in _wait_refused(alice, curated_image)
    assert alice.call("DELETE", "/v1.41/images/big").status == 200
    assert _create(alice, curated_image, ["true"]).status == 201


def test_rmi_no_prune_leaves_no_steps_that_no_one_could_name(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    built = student.build(f"FROM {curated_image}\nRUN echo a > /a\nRUN echo b > /b\n", tag="steps")
    steps = [
        line["stream"].split()[-1]
        for line in (json.loads(raw) for raw in built.body.splitlines() if raw.strip())
        if line.get("stream", "").startswith(" ---> ") and "Running in" not in line["stream"]
    ]
    # The first is the image the build is FROM.
    steps = steps[1:]
    assert len(steps) >= 2, built.body
    assert student.call("DELETE", "/v1.41/images/steps?noprune=1").status == 200
    left = {image["Id"].removeprefix("sha256:")[:12] for image in engine.images(all=True)}
    assert not set(steps) & left


def test_the_workstation_writes_nothing_to_the_engines_disk(
    sandbox_factory: Any, engine: docker.APIClient
) -> None:
    with override_settings(SANDBOX_FILES_MB=16):
        sandbox = sandbox_factory()
    container = sandbox.workstation.container_id

    def shell(command: str) -> tuple[int, str]:
        exec_id = engine.exec_create(container, ["bash", "-c", command], user="1000")["Id"]
        output = engine.exec_start(exec_id).decode()
        return int(engine.exec_inspect(exec_id)["ExitCode"]), output

    # Its home and /tmp take what fits in their room, and a write past it fails as on a full disk.
    for place in ("$HOME", "/tmp", "/var/tmp"):
        code, output = shell(f"dd if=/dev/zero of={place}/fill bs=1M count=40")
        assert code != 0 and "No space left on device" in output, (place, output)
    # Nowhere else can they write: the root file system is read-only (writable, it would give them /run/lock
    # too). Only the places in memory are listed, as the roots of their own file systems.
    code, output = shell("find / -xdev -writable 2>/dev/null; touch /run/lock/x")
    assert code != 0, output
    assert sorted(output.splitlines()) == [
        "/home/student",
        "/tmp",
        "/var/tmp",
        "touch: cannot touch '/run/lock/x': Read-only file system",
    ], output
    size = engine.containers(all=True, size=True, filters={"id": container})[0].get("SizeRw", 0)
    assert size < MB, size
    # The room comes back as the student removes what they made, and the shell goes on.
    code, output = shell("rm ~/fill && echo 'FROM busybox' > ~/Dockerfile && cat ~/Dockerfile")
    assert code == 0 and "FROM busybox" in output, output
    # The shell's own settings are the image's, not files of the (empty) home.
    code, output = shell("bash -lic 'echo \"$PS1\"; type exit' 2>&1")
    assert code == 0 and "@workstation" in output and "exit is a function" in output, output
    assert engine.inspect_container(container)["State"]["Running"]


def test_a_container_that_writes_and_stops_between_two_looks_counts(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=16)
    # Its first run writes nothing and is measured; each later one writes 24 MB and stops at once.
    command = "test -e /ran && dd if=/dev/zero of=/fill$RANDOM bs=1M count=24; touch /ran"
    writer = alice.run(curated_image, ["sh", "-c", command])
    assert _wait_stopped(engine, writer)["ExitCode"] == 0
    time.sleep(2 * CHECK_SECONDS)
    assert _create(alice, curated_image, ["true"]).status == 201
    assert alice.call("POST", f"/v1.41/containers/{writer}/start").status == 204
    _wait_stopped(engine, writer)
    assert "MB in its containers" in _wait_refused(alice, curated_image)


def test_own_images_count_against_the_budget_and_a_layer_they_share_counts_once(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=40)
    writer = _filled(alice, engine, curated_image, 16)
    committed = alice.call("POST", f"/v1.41/commit?container={writer}&repo=filled")
    assert committed.status == 201, committed.body
    assert alice.call("DELETE", f"/v1.41/containers/{writer}").status == 204
    # Images built on it hold the same 16 MB: counted for each, 48 MB, past the budget.
    for word in ("more", "most"):
        built = alice.build(f"FROM filled\nRUN echo {word} > /{word}\n", tag=f"filled-{word}")
        assert b'"error"' not in built.body, built.body
    time.sleep(2 * CHECK_SECONDS + 1)
    answer = _create(alice, curated_image, ["true"])
    assert answer.status == 201, answer.body
    alice.call("DELETE", f"/v1.41/containers/{answer.json()['Id']}")
    # Its images' 16 MB count: 26 MB more in a container is past the budget, though the container alone is not.
    writer = alice.run(curated_image, ["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=26 && sleep 600"])
    assert _wait_stopped(engine, writer)["ExitCode"] == 137
    assert "MB in its images" in _wait_refused(alice, curated_image)


def test_a_commit_that_would_take_the_sandbox_past_its_budget_is_refused_before_it_is_written(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice = student_factory(disk_budget_mb=40)
    # Within the budget as it stands; the engine would write its 24 MB again for the image, in one request.
    writer = _filled(alice, engine, curated_image, 24)
    answer = alice.call("POST", f"/v1.41/commit?container={writer}&repo=filled")
    assert answer.status == 403, answer.body
    assert "would keep" in answer.message and "more than the 40 MB" in answer.message, answer.message
    assert not owned_objects(engine, alice)["images"]
    # Once the student has made room, it goes through.
    small = _filled(alice, engine, curated_image, 8)
    assert alice.call("DELETE", f"/v1.41/containers/{writer}").status == 204
    assert alice.call("POST", f"/v1.41/commit?container={small}&repo=filled").status == 201


def test_a_restarted_gateway_stops_nothing_it_did_not_see_grow(
    student_factory: Any, curated_image: str, engine: docker.APIClient, gateway_process: GatewayProcess
) -> None:
    alice = student_factory(disk_budget_mb=40)
    # 24 MB, written and done with; the sandbox is within its budget.
    quiet = alice.run(curated_image, ["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=24 && sleep 600"])
    time.sleep(2 * CHECK_SECONDS)
    assert _create(alice, curated_image, ["true"]).status == 201
    gateway_process.kill()
    # The budget falls while the gateway is down: the sandbox is over it as the gateway comes back.
    gateway_session_open(
        session_id=alice.session_id,
        owner_key=f"owner-{alice.session_id}",
        expires_at=int(time.time()) + 3600,
        memory_budget_mb=512,
        max_containers=8,
        disk_budget_mb=16,
    )
    gateway_process.start()
    _wait_for_socket(alice.socket)
    message = _wait_refused(alice, curated_image)
    assert "more than the 16 MB it may" in message and "was stopped" not in message, message
    time.sleep(2 * CHECK_SECONDS)
    assert engine.inspect_container(quiet)["State"]["Running"]
