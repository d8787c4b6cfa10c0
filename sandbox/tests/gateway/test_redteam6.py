"""Sixth red-team pass: the build cache as the engine reads the build's parameters, the engine's event
history replayed, and other students' objects named through the container, exec and image endpoints."""

import io
import json
import shutil
import tarfile
from typing import Any
from urllib.parse import quote

import docker
import pytest

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

KEY_STEP = "RUN head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' | tee /key; echo"


def _context(dockerfile: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _build(student: StudentSession, dockerfile: str, query: str = "t=probe") -> Any:
    return student.call(
        "POST", f"/v1.41/build?{query}", body=_context(dockerfile), headers={"Content-Type": "application/x-tar"}
    )


def _token(output: bytes) -> bytes:
    """What KEY_STEP printed: its random bytes, in hex, on a line of their own."""
    text = "".join(json.loads(line).get("stream", "") for line in output.splitlines() if line.strip())
    return next(
        line for line in text.split() if len(line) == 32 and all(c in "0123456789abcdef" for c in line)
    ).encode()


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
    key = _token(first.body)

    theirs = _build(bob, dockerfile, f"t=probe&{query}")
    assert theirs.status == 200 and b"Successfully tagged probe:latest" in theirs.body, theirs.body
    assert b"Using cache" not in theirs.body and key not in theirs.body, theirs.body
    assert _token(theirs.body) != key


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
    assert _token(fresh.body) != _token(first.body)


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
    assert built.status in (200, 403), built.body
    assert engine.inspect_image(curated_image)["Parent"] == parent, built.body
    rows = bob.call("GET", f"/v1.41/images/{curated_image}/history").json()
    assert [row["Id"] for row in rows] == [row["Id"] for row in history]
