"""Fourth red-team pass: build contexts unpacked otherwise than they were checked, and instructions that make the
engine keep far more than the student sent."""

import io
import tarfile
from typing import Any

import docker
import pytest

from .conftest import StudentSession, owned_objects

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

TAR = {"Content-Type": "application/x-tar"}


def _member(
    archive: tarfile.TarFile, name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _linked_context(trick: str, checked: str, unpacked: str) -> bytes:
    """A context whose Dockerfile is `checked` as a tar reader reads it, and `unpacked` once the engine has
    unpacked it in order: a later member is written through a directory that is a link by then."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        _member(archive, "Dockerfile", checked.encode())
        if trick == "hard link to a symbolic link":
            _member(archive, "s", kind=tarfile.SYMTYPE, link=".")
            _member(archive, "d", kind=tarfile.LNKTYPE, link="s")
            _member(archive, "d/Dockerfile", unpacked.encode())
        else:
            _member(archive, "d", kind=tarfile.SYMTYPE, link=".")
            _member(archive, "d/Dockerfile", unpacked.encode())
            _member(archive, "d", b"a file by the end")
    return buffer.getvalue()


@pytest.mark.parametrize("trick", ["hard link to a symbolic link", "symbolic link that a file replaces"])
def test_a_dockerfile_replaced_through_a_link_is_refused(
    student_factory: Any, curated_image: str, engine: docker.APIClient, trick: str
) -> None:
    # The Dockerfile the engine reads would be one the gateway never saw: FROM another student's image here,
    # or an image from a registry, an ADD of a URL the engine fetches, ONBUILD.
    alice: StudentSession = student_factory()
    built = alice.build(f"FROM {curated_image}\nRUN echo alice > /secret\n", tag="private")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    alices = str(alice.call("GET", "/v1.41/images/private/json").json()["Id"])
    bob: StudentSession = student_factory()
    context = _linked_context(trick, f"FROM {curated_image}\n", f"FROM {alices}\nRUN cat /secret\n")
    answer = bob.call("POST", "/v1.41/build?t=stolen", body=context, headers=TAR)
    assert answer.status == 403 and "symbolic link" in answer.message, answer.body
    assert b"alice" not in answer.body
    assert owned_objects(engine, bob)["images"] == []
