"""Two students at once: the same names, and no way to reach the other's objects by any name or ID."""

import io
import tarfile
from typing import Any

import docker
import pytest
from django.conf import settings

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _build(student: StudentSession, dockerfile: str, tag: str) -> Any:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return student.call(
        "POST", f"/v1.41/build?t={tag}", body=buffer.getvalue(), headers={"Content-Type": "application/x-tar"}
    )


def test_two_students_same_names_no_crossing(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    for student, word in ((alice, "alice"), (bob, "bob")):
        built = _build(student, f"FROM {curated_image}\nRUN echo {word} > /who\n", "myapp")
        assert built.status == 200 and b"Successfully tagged myapp:latest" in built.body, built.body
        student.run("myapp", ["sleep", "60"], name="web")
        assert student.call("POST", "/volumes/create", {"Name": "data"}).status == 201
    a_web = alice.call("GET", "/containers/web/json").json()
    b_web = bob.call("GET", "/containers/web/json").json()
    assert a_web["Id"] != b_web["Id"] and a_web["Name"] == b_web["Name"] == "/web"
    assert a_web["Config"]["Image"] == "myapp"
    a_image = alice.call("GET", "/images/myapp/json").json()
    b_image = bob.call("GET", "/images/myapp/json").json()
    assert a_image["Id"] != b_image["Id"] and a_image["RepoTags"] == ["myapp:latest"]

    a_names = {c["Names"][0] for c in alice.call("GET", "/containers/json?all=1").json()}
    assert a_names == {"/web"}
    a_tags = {t for i in alice.call("GET", "/images/json").json() for t in i["RepoTags"]}
    assert "myapp:latest" in a_tags and not any("-s" in t and "/" in t for t in a_tags)

    prefix = f"{settings.SANDBOX_NAMESPACE}-s{alice.session_id}"
    for ref in (a_web["Id"], a_web["Id"][:12], a_web["Id"][:4], f"{prefix}-web"):
        for method, path in (
            ("GET", f"/containers/{ref}/json"),
            ("POST", f"/containers/{ref}/stop"),
            ("DELETE", f"/containers/{ref}?force=1"),
            ("POST", f"/containers/{ref}/exec"),
            ("GET", f"/containers/{ref}/logs?stdout=1"),
        ):
            answer = bob.call(method, path, {"Cmd": ["id"]} if path.endswith("exec") else None)
            assert answer.status == 404 and answer.message == f"No such container: {ref}", (path, answer.body)
    for ref in (a_image["Id"], a_image["Id"][7:19], f"{prefix}/myapp:latest"):
        answer = bob.call("GET", f"/images/{ref}/json")
        assert answer.status == 404 and answer.message.startswith("No such image"), answer.body
        assert bob.call("DELETE", f"/images/{ref}?force=1").status == 404
        assert bob.call("POST", f"/images/{ref}/tag?repo=stolen").status == 404
        created = bob.call("POST", "/containers/create", {"Image": ref, "Cmd": ["true"]})
        assert created.status == 404
    stolen = _build(bob, f"FROM {a_image['Id']}\n", "stolen")
    assert stolen.status == 404
    exec_id = alice.call("POST", "/containers/web/exec", {"Cmd": ["true"]}).json()["Id"]
    assert bob.call("GET", f"/exec/{exec_id}/json").status == 404
    assert bob.call("POST", f"/exec/{exec_id}/start", {"Detach": True}).status == 404
    assert bob.call("GET", f"/networks/{alice.network}").status == 404
    assert [n["Name"] for n in bob.call("GET", "/networks").json()] == [bob.network]
    assert bob.call("GET", f"/volumes/{prefix}-data").status == 404
    assert bob.call("DELETE", f"/volumes/{prefix}-data").status == 404
    assert [v["Name"] for v in bob.call("GET", "/volumes").json()["Volumes"]] == ["data"]
    events = bob.call("GET", "/events?until=1")
    assert events.status == 200

    assert engine.inspect_container(a_web["Id"])["State"]["Running"]
    assert engine.inspect_image(a_image["Id"])
