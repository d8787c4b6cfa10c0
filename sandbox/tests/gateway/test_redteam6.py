"""Sixth red-team pass: the build cache as the engine reads the build's parameters, the engine's event
history replayed, and other students' objects named through the container, exec and image endpoints."""

import io
import json
import os
import shutil
import socket
import tarfile
import time
from typing import Any
from urllib.parse import quote

import docker
import docker.errors
import pytest
from django.conf import settings

from .conftest import KEY_STEP, StudentSession, dockerfile_context, printed_key

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _build(student: StudentSession, dockerfile: str, query: str = "t=probe") -> Any:
    return student.call(
        "POST",
        f"/v1.41/build?{query}",
        body=dockerfile_context(dockerfile),
        headers={"Content-Type": "application/x-tar"},
    )


@pytest.mark.parametrize(
    "query",
    [
        "nocache=0&cachefrom=" + quote(json.dumps(["nosuch:latest"])),
        "nocache=false&cachefrom=" + quote(json.dumps(["nosuch:latest"])),
        "nocache=0&nocache=1&cachefrom=" + quote(json.dumps(["nosuch:latest"])),
    ],
    ids=["nocache=0", "nocache=false", "nocache twice"],
)
def test_a_build_naming_no_cache_source_of_its_own_reuses_no_other_students_step(
    student_factory: Any, curated_image: str, query: str
) -> None:
    """With none of the named cache sources found, the gateway turns the cache off; a nocache the student
    sends first is the one the engine reads, and with no source at all the engine's cache is every image."""
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    dockerfile = f"FROM {curated_image}\n{KEY_STEP}\n"
    first = _build(alice, dockerfile)
    assert first.status == 200 and b"Successfully tagged probe:latest" in first.body, first.body
    key = printed_key(first.body)

    theirs = _build(bob, dockerfile, f"t=probe&{query}")
    assert theirs.status == 200 and b"Successfully tagged probe:latest" in theirs.body, theirs.body
    assert b"Using cache" not in theirs.body and key not in theirs.body, theirs.body
    assert printed_key(theirs.body) != key


def test_a_build_asked_to_use_its_cache_still_reuses_its_own_steps(
    student: StudentSession, curated_image: str
) -> None:
    dockerfile = f"FROM {curated_image}\n{KEY_STEP}\n"
    first = _build(student, dockerfile)
    assert first.status == 200, first.body
    again = _build(student, dockerfile, "t=probe&nocache=0")
    assert again.status == 200 and b"Using cache" in again.body, again.body
    fresh = _build(student, dockerfile, "t=probe&nocache=1")
    assert fresh.status == 200 and b"Using cache" not in fresh.body, fresh.body
    assert printed_key(fresh.body) != printed_key(first.body)


def test_a_build_cannot_give_a_curated_image_a_parent_of_its_own(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    """A cache source's history is matched by its commands alone, and a step matching its last makes the engine
    set the source's parent to the step's: steps that read as the curated image's own (a RUN spelling one of
    its commands in one word, so that no image of the curated build is found by its configuration, then a RUN
    spelling the builder's comment for its LABEL) gave the curated image, every student's, a parent this
    student's build had made."""
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    parent = engine.inspect_image(curated_image)["Parent"]
    history = alice.call("GET", f"/v1.41/images/{curated_image}/history").json()
    commands = [str(row["CreatedBy"]) for row in reversed(history)]
    assert commands[0].startswith("/bin/sh -c #(nop) COPY file:") and "LABEL" in commands[-1], commands
    lines = ["FROM scratch", "COPY busybox /bin/busybox"]
    for command in commands[1:]:
        nop = command.removeprefix("/bin/sh -c #(nop)  ")
        if nop == command:
            lines.append("RUN " + json.dumps([command]))
        elif nop.startswith("LABEL "):
            lines.append("RUN " + json.dumps(["/bin/sh", "-c", "#(nop) ", nop]))
        else:
            lines.append(nop)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = ("\n".join(lines) + "\n").encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        archive.add(shutil.which("busybox") or "/bin/busybox", arcname="busybox")
    built = alice.call(
        "POST", "/v1.41/build?t=lookalike", body=buffer.getvalue(), headers={"Content-Type": "application/x-tar"}
    )
    assert built.status == 200, built.body
    assert engine.inspect_image(curated_image)["Parent"] == parent, built.body
    rows = bob.call("GET", f"/v1.41/images/{curated_image}/history").json()
    assert [row["Id"] for row in rows] == [row["Id"] for row in history]


def test_the_engines_event_history_shows_nothing_of_another_student(
    student_factory: Any, curated_image: str
) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    since = int(time.time()) - 1
    container = alice.run(curated_image, ["sleep", "600"], name="web")
    created = alice.call("POST", "/v1.41/containers/web/exec", {"Cmd": ["true"], "AttachStdout": True})
    assert created.status == 201, created.body
    assert alice.call("POST", "/v1.41/volumes/create", {"Name": "data"}).status == 201
    built = _build(alice, f"FROM {curated_image}\nRUN echo alice > /a\n")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    image = str(alice.call("GET", "/v1.41/images/probe/json").json()["Id"])
    assert alice.call("POST", f"/v1.41/images/{curated_image}/tag?repo=mine&tag=v1").status == 201
    committed = alice.call("POST", "/v1.41/commit?container=web&repo=saved")
    assert committed.status == 201, committed.body
    assert alice.call("DELETE", "/v1.41/images/mine:v1").status == 200
    assert alice.call("DELETE", "/v1.41/containers/web?force=1").status == 204
    assert alice.call("DELETE", "/v1.41/volumes/data").status == 204
    until = int(time.time()) + 1
    secrets = [container, image.removeprefix("sha256:"), str(committed.json()["Id"]).removeprefix("sha256:")]
    secrets += [f"-s{alice.session_id}", alice.network, str(created.json()["Id"])]
    filters: list[dict[str, list[str]]] = [{}]
    filters += [{"type": [kind]} for kind in ("container", "image", "volume", "network", "daemon", "builder")]
    filters += [{"image": [curated_image]}, {"event": ["tag", "untag", "commit", "create", "destroy"]}]
    for wanted in filters:
        query = f"since={since}&until={until}" + (f"&filters={quote(json.dumps(wanted))}" if wanted else "")
        answer = bob.call("GET", f"/v1.41/events?{query}")
        assert answer.status == 200, (wanted, answer.body)
        text = answer.body.decode()
        assert not [s for s in secrets if s in text], (wanted, text)
    mine = alice.call("GET", f"/v1.41/events?since={since}&until={until}").body.decode()
    assert container in mine and "saved" in mine, mine


def test_another_students_objects_answer_as_objects_that_do_not_exist(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    container = alice.run(curated_image, ["sleep", "600"], name="web")
    assert alice.call("POST", "/v1.41/volumes/create", {"Name": "data"}).status == 201
    built = _build(alice, f"FROM {curated_image}\nRUN echo alice > /a\n")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    image = str(alice.call("GET", "/v1.41/images/probe/json").json()["Id"])
    network = engine.inspect_network(alice.network)["Id"]
    prefix = f"{settings.SANDBOX_NAMESPACE}-s{alice.session_id}"
    fake_container = "f" * 64
    pairs = [
        (container, fake_container),
        (container[:12], fake_container[:12]),
        (f"{prefix}-web", f"{prefix}-nothere"),
    ]
    container_paths = [
        ("GET", "/v1.41/containers/{}/json"),
        ("GET", "/v1.41/containers/{}/top"),
        ("GET", "/v1.41/containers/{}/changes"),
        ("GET", "/v1.41/containers/{}/stats?stream=0"),
        ("HEAD", "/v1.41/containers/{}/archive?path=/"),
        ("POST", "/v1.41/containers/{}/wait"),
        ("POST", "/v1.41/containers/{}/resize?h=1&w=1"),
        ("POST", "/v1.41/containers/{}/start"),
        ("POST", "/v1.41/containers/{}/kill"),
        ("DELETE", "/v1.41/containers/{}?force=1"),
        ("POST", "/v1.41/commit?container={}"),
        ("GET", "/v1.41/containers/{}/json/"),
        ("GET", "/v1.40/containers/{}/json"),
        ("GET", "/containers/{}/json"),
    ]
    checks = [(method, path, pair) for method, path in container_paths for pair in pairs]
    image_paths = [
        ("GET", "/v1.41/images/{}/json"),
        ("GET", "/v1.41/images/{}/history"),
        ("POST", "/v1.41/images/{}/tag?repo=stolen"),
        ("DELETE", "/v1.41/images/{}?force=1"),
        ("POST", "/v1.41/containers/create?name=x&_={}"),
    ]
    fake_image = "sha256:" + "e" * 64
    image_pairs = [
        (image, fake_image),
        (image.removeprefix("sha256:")[:12], fake_image.removeprefix("sha256:")[:12]),
        (f"{prefix}/probe", f"{prefix}/nothere"),
    ]
    checks += [(method, path, pair) for method, path in image_paths for pair in image_pairs]
    other = [
        ("GET", "/v1.41/volumes/{}", (f"{prefix}-data", f"{prefix}-nothere")),
        ("DELETE", "/v1.41/volumes/{}", (f"{prefix}-data", f"{prefix}-nothere")),
        ("GET", "/v1.41/networks/{}", (alice.network, alice.network + "0")),
        ("GET", "/v1.41/networks/{}", (network, "0" * 64)),
        ("GET", "/v1.41/networks/{}", (network[:12], "0" * 12)),
    ]
    checks += other
    for method, path, (real, fake) in checks:
        if path.startswith("/v1.41/containers/create"):
            answers = [
                bob.call("POST", "/v1.41/containers/create", {"Image": ref, "Cmd": ["true"]})
                for ref in (real, fake)
            ]
        else:
            answers = [bob.call(method, path.format(ref)) for ref in (real, fake)]
        theirs, none = answers
        assert (theirs.status, theirs.message.replace(real, "REF")) == (
            none.status,
            none.message.replace(fake, "REF"),
        ), (method, path, real, theirs.body, none.body)
        assert theirs.status >= 400, (method, path, real, theirs.body)
    assert alice.call("GET", "/v1.41/containers/web/json").json()["State"]["Running"]
    assert alice.call("GET", "/v1.41/images/probe/json").status == 200


def test_a_curated_image_reads_the_same_whatever_another_student_does_with_it(
    student_factory: Any, curated_image: str
) -> None:
    """Another student tagging, running, building on or committing from a curated image changes nothing of
    what this student is shown of it."""
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()

    def seen() -> list[Any]:
        listed = [e for e in bob.call("GET", "/v1.41/images/json?all=1").json() if curated_image in e["RepoTags"]]
        return [
            bob.call("GET", f"/v1.41/images/{curated_image}/json").json(),
            bob.call("GET", f"/v1.41/images/{curated_image}/history").json(),
            listed,
        ]

    before = seen()
    time.sleep(1.1)
    assert alice.call("POST", f"/v1.41/images/{curated_image}/tag?repo=mine&tag=v1").status == 201
    alice.run(curated_image, ["sleep", "600"], name="web")
    assert alice.call("POST", "/v1.41/commit?container=web&repo=saved").status == 201
    built = _build(alice, f"FROM {curated_image}\nRUN echo alice > /a\n")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    assert alice.call("DELETE", "/v1.41/images/mine:v1").status == 200
    assert seen() == before


def _step(engine: docker.APIClient, image: str) -> str:
    """The instruction that made an image, as the builder wrote it; nothing for one already gone."""
    try:
        return " ".join(engine.inspect_image(image)["ContainerConfig"].get("Cmd") or [])
    except docker.errors.NotFound:
        return ""


def _assert_no_copy_left(engine: docker.APIClient, before: set[str], *, within: float) -> None:
    """No image but those in `before` holds what a step copied to /blob, once the gateway has had `within`
    seconds to remove them; any found is removed."""
    deadline = time.monotonic() + within
    while True:
        left = {image["Id"] for image in engine.images(all=True)} - before
        copied = [image for image in left if " in /blob " in _step(engine, image)]
        if not copied or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    try:
        assert not copied, copied
    finally:
        for image in copied:
            engine.remove_image(image, force=True)


LEFTOVERS = {
    "a failed build from scratch": "FROM scratch\nCOPY blob /blob\nENV STEP=two\nRUN false\n",
    "a failed later stage from scratch": (
        "FROM {base} AS first\nRUN true\nFROM scratch\nCOPY blob /blob\nRUN false\n"
    ),
    "a failed later stage": "FROM {base} AS first\nRUN true\nFROM {base}\nCOPY blob /blob\nRUN false\n",
    "an earlier stage of a build that failed": "FROM {base} AS first\nCOPY blob /blob\nFROM {base}\nRUN false\n",
    "an earlier stage of a build that succeeded": (
        "FROM {base} AS first\nCOPY blob /blob\nFROM {base}\nCOPY --from=first /blob /copied\n"
    ),
}


@pytest.mark.parametrize("dockerfile", LEFTOVERS.values(), ids=list(LEFTOVERS))
def test_a_build_leaves_no_image_that_no_one_can_name(
    student: StudentSession, engine: docker.APIClient, curated_image: str, dockerfile: str
) -> None:
    """What a failed build's steps made was removed only when the engine had not named an image built (it
    names the last image of every stage as it ends) and when it descended from one of the build's base images
    (a stage from scratch descends from none), and an earlier stage's image was never removed: each such image
    kept what it copied on the engine's disk, unlabelled, in no student's list, as often as the student
    built."""
    blob = os.urandom(256 * 1024)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("Dockerfile", dockerfile.format(base=curated_image).encode()), ("blob", blob)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    before = {image["Id"] for image in engine.images(all=True)}
    answer = student.call(
        "POST", "/v1.41/build?t=probe", body=buffer.getvalue(), headers={"Content-Type": "application/x-tar"}
    )
    assert answer.status == 200 and (b"errorDetail" in answer.body) == ("false" in dockerfile), answer.body
    built = student.call("GET", "/v1.41/images/probe/json")
    kept = {row["Id"] for row in engine.history(built.json()["Id"])} if built.status == 200 else set()
    _assert_no_copy_left(engine, before | kept, within=20)


def test_a_build_cut_short_leaves_no_image_that_no_one_can_name(
    student: StudentSession, engine: docker.APIClient, curated_image: str
) -> None:
    """A build the student stops (docker build, interrupted) in a later stage: the engine named the earlier
    stage's image as that stage ended, and it was taken for the image built, and kept."""
    dockerfile = f"FROM {curated_image} AS first\nCOPY blob /blob\nFROM {curated_image}\nRUN sleep 60\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("Dockerfile", dockerfile.encode()), ("blob", os.urandom(256 * 1024))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    body = buffer.getvalue()
    before = {image["Id"] for image in engine.images(all=True)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(student.socket))
        sock.settimeout(60)
        head = "POST /v1.41/build?t=probe HTTP/1.1\r\nHost: docker\r\nContent-Type: application/x-tar\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = b""
        while b"Running in" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    _assert_no_copy_left(engine, before, within=40)
