"""Fourth red-team pass: build contexts unpacked otherwise than they were checked, and instructions that make the
engine keep far more than the student sent."""

import io
import json
import tarfile
from typing import Any
from urllib.parse import quote

import docker
import pytest

from sandbox.gateway.policy import LABELS_MAX, MAX_IMAGE_VOLUMES

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


def _named(name: str, times: int = 10) -> str:
    return "".join(f"${{{name}}}" for _ in range(times))


# A few hundred bytes each, that the engine would make into hundreds of kilobytes of every step's configuration
# (and, a line more, ten times as much, in minutes of the engine's time).
MULTIPLYING = {
    "ENV naming ENV": f"ENV a={'x' * 1000}\nENV b={_named('a')}\nENV c={_named('b')}\nENV d={_named('c', 3)}\n",
    "ARG naming ARG": f"ARG a={'x' * 1000}\nARG b={_named('a')}\nARG c={_named('b')}\nENV d={_named('c', 3)}\n",
    "EXPOSE range": "EXPOSE 1-65535\n",
    "EXPOSE range in a variable": "ARG P=1-65535\nEXPOSE $P\n",
    "EXPOSE of numbers too long to read": f"EXPOSE 1-{'9' * 5000}\n",
}


@pytest.mark.parametrize("lines", MULTIPLYING.values(), ids=list(MULTIPLYING))
def test_variables_and_port_ranges_cannot_multiply_an_images_configuration(
    student: StudentSession, curated_image: str, engine: docker.APIClient, lines: str
) -> None:
    answer = student.build(f"FROM {curated_image}\n{lines}", tag="grown")
    assert answer.status == 403 and "may add at most 256 KB" in answer.message, answer.body
    assert owned_objects(engine, student)["images"] == []
    # As lessons use them, variables are as docker has them.
    usual = (
        "ARG APP=/app\nENV PATH=$PATH:$APP/bin HOME=$APP\nWORKDIR $HOME\nEXPOSE 8000-8010\nARG PORT=8080\n"
        "EXPOSE $PORT\nRUN echo $PATH\n"
    )
    built = student.build(f"FROM {curated_image}\n{usual}", tag="usual")
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    config = student.call("GET", "/v1.41/images/usual/json").json()["Config"]
    assert config["WorkingDir"] == "/app" and "PATH=/bin:/app/bin" in config["Env"], config
    assert "8080/tcp" in config["ExposedPorts"], config


def test_a_commit_cannot_multiply_its_containers_variables(student: StudentSession, curated_image: str) -> None:
    # 100 KB of environment (a create body holds 1 MB) and a change of 200 bytes: a 4 MB configuration.
    created = student.call(
        "POST", "/v1.41/containers/create?name=src", {"Image": curated_image, "Env": ["A=" + "a" * 100_000]}
    )
    assert created.status == 201, created.body
    change = quote("ENV B=" + "$A" * 40)
    refused = student.call("POST", f"/v1.41/commit?container=src&repo=grown&changes={change}")
    assert refused.status == 403 and "may add at most 256 KB" in refused.message, refused.body
    assert student.call("GET", "/v1.41/images/grown/json").status == 404
    kept = student.call("POST", f"/v1.41/commit?container=src&repo=kept&changes={quote('ENV B=$A')}")
    assert kept.status == 201, kept.body


def test_an_image_has_a_bounded_number_of_volumes(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    # Each step of a build is a container the engine makes with the image's volumes, one directory each on its
    # disk, listed for every student while it lasts: one VOLUME line could name thousands.
    paths = [f"/v{index}" for index in range(MAX_IMAGE_VOLUMES + 1)]
    answer = student.build(f"FROM {curated_image}\nVOLUME {' '.join(paths)}\nRUN true\n", tag="volumes")
    assert answer.status == 403 and f"at most {MAX_IMAGE_VOLUMES} volumes" in answer.message, answer.body
    as_json = student.build(f"FROM {curated_image}\nVOLUME {json.dumps(paths)}\n", tag="volumes")
    assert as_json.status == 403, as_json.body
    assert owned_objects(engine, student)["images"] == []

    # A commit's volumes count too, and are counted again when a build starts from its image.
    created = student.call("POST", "/v1.41/containers/create?name=src", {"Image": curated_image})
    assert created.status == 201, created.body
    many = quote(f"VOLUME {' '.join(paths)}")
    refused = student.call("POST", f"/v1.41/commit?container=src&repo=many&changes={many}")
    assert refused.status == 403 and "volumes" in refused.message, refused.body
    half = quote(f"VOLUME {' '.join(paths[: MAX_IMAGE_VOLUMES // 2 + 1])}")
    committed = student.call("POST", f"/v1.41/commit?container=src&repo=half&changes={half}")
    assert committed.status == 201, committed.body
    on_top = student.build(f"FROM half\nVOLUME {' '.join(paths[MAX_IMAGE_VOLUMES // 2 :])}\n", tag="more")
    assert on_top.status == 403 and "volumes" in on_top.message, on_top.body


def test_a_volume_carries_a_bounded_amount_of_labels(student: StudentSession, engine: docker.APIClient) -> None:
    # The engine keeps every volume's labels in its memory and in its one answer to docker system df: fifty
    # volumes of 1 MB of labels each were 50 MB of it, and two such sandboxes made that answer too large to read.
    labels = {f"k{index}": "x" * 1000 for index in range(LABELS_MAX // 1000 + 1)}
    refused = student.call("POST", "/v1.41/volumes/create", {"Name": "big", "Labels": labels})
    assert refused.status == 403 and "labels" in refused.message, refused.body
    assert owned_objects(engine, student)["volumes"] == []
    small = student.call("POST", "/v1.41/volumes/create", {"Name": "small", "Labels": {"lesson": "volumes"}})
    assert small.status == 201, small.body
    assert small.json()["Labels"] == {"lesson": "volumes"}
