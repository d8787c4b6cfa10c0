"""Two students at once: the same names, and no way to reach the other's objects by any name or ID."""

import io
from typing import Any

import docker
import pytest
from django.conf import settings

from .conftest import StudentSession, dockerfile_context

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def test_two_students_same_names_no_crossing(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    for student, word in ((alice, "alice"), (bob, "bob")):
        built = student.build(f"FROM {curated_image}\nRUN echo {word} > /who\n", tag="myapp")
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
    stolen = bob.build(f"FROM {a_image['Id']}\n", tag="stolen")
    assert stolen.status == 404
    exec_id = alice.call("POST", "/containers/web/exec", {"Cmd": ["true"]}).json()["Id"]
    assert bob.call("GET", f"/exec/{exec_id}/json").status == 404
    assert bob.call("POST", f"/exec/{exec_id}/start", {"Detach": True}).status == 404
    assert bob.call("GET", f"/networks/{alice.network}").status == 404
    # Each sees their own network as docker's default one, named bridge.
    bob_network = engine.inspect_network(bob.network)["Id"]
    assert [(n["Name"], n["Id"]) for n in bob.call("GET", "/networks").json()] == [("bridge", bob_network)]
    assert bob.call("GET", "/networks/bridge").json()["Id"] == bob_network
    assert bob.call("GET", f"/volumes/{prefix}-data").status == 404
    assert bob.call("DELETE", f"/volumes/{prefix}-data").status == 404
    assert [v["Name"] for v in bob.call("GET", "/volumes").json()["Volumes"]] == ["data"]
    events = bob.call("GET", "/events?until=1")
    assert events.status == 200

    assert engine.inspect_container(a_web["Id"])["State"]["Running"]
    assert engine.inspect_image(a_image["Id"])


def test_another_sites_student_with_the_same_session_id_is_someone_else(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    """Sites sharing an engine number their sessions alike; an image is a student's only on their own site."""
    from sandbox.gateway.client import gateway_session_purge

    other_site = {
        "layercake.managed": "1",
        "layercake.namespace": f"{settings.SANDBOX_NAMESPACE}-elsewhere",
        "layercake.session": str(student.session_id),
    }
    output = list(
        engine.build(
            fileobj=io.BytesIO(dockerfile_context(f"FROM {curated_image}\nRUN echo elsewhere > /who\n")),
            custom_context=True,
            labels=other_site,
            rm=True,
            decode=True,
        )
    )
    theirs = next(line["aux"]["ID"] for line in output if "aux" in line)
    try:
        assert student.build(f"FROM {curated_image}\nRUN echo mine > /who\n", tag="mine").status == 200
        mine = student.call("GET", "/v1.41/images/mine/json").json()["Id"]
        listed = {image["Id"] for image in student.call("GET", "/v1.41/images/json?all=1").json()}
        assert mine in listed and theirs not in listed
        assert student.call("GET", f"/v1.41/images/{theirs}/json").status == 404
        pruned = student.call("POST", '/v1.41/images/prune?filters={"dangling":["false"]}')
        assert pruned.status == 200, pruned.body
        gateway_session_purge(session_id=student.session_id)
        assert engine.inspect_image(theirs)["Id"] == theirs
        with pytest.raises(docker.errors.NotFound):
            engine.inspect_image(mine)
    finally:
        engine.remove_image(theirs, force=True)


def test_an_image_built_on_the_engine_from_a_curated_one_is_not_curated(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    """It inherits the catalog's label, but it is someone's own image: no student sees, runs or builds on it."""
    private = f"{settings.SANDBOX_NAMESPACE}-private:latest"
    labels = {"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE}
    context = dockerfile_context(f"FROM {curated_image}\nRUN echo secret > /secret\n")
    list(engine.build(fileobj=io.BytesIO(context), custom_context=True, tag=private, labels=labels, rm=True))
    try:
        assert engine.inspect_image(private)["Config"]["Labels"]["layercake.catalog"] == curated_image
        tags = {t for i in student.call("GET", "/images/json").json() for t in i["RepoTags"]}
        assert curated_image in tags and private not in tags
        assert student.call("GET", f"/images/{private}/json").status == 404
        created = student.call("POST", "/containers/create", {"Image": private, "Cmd": ["cat", "/secret"]})
        assert created.status == 404 and "No such image" in created.message, created.body
        built = student.build(f"FROM {private}\n", tag="mine")
        assert b"Successfully built" not in built.body, built.body
    finally:
        engine.remove_image(private, force=True)


def test_a_catalog_image_made_for_another_site_is_not_curated_here(
    student: StudentSession, engine: docker.APIClient
) -> None:
    name = f"{settings.SANDBOX_NAMESPACE}-elsewhere:latest"
    labels = {"layercake.managed": "1", "layercake.catalog": name, "layercake.namespace": "another-site"}
    context = dockerfile_context("FROM scratch\nLABEL made=elsewhere\n")
    list(engine.build(fileobj=io.BytesIO(context), custom_context=True, tag=name, labels=labels, rm=True))
    try:
        tags = {t for i in student.call("GET", "/images/json").json() for t in i["RepoTags"]}
        assert name not in tags
        assert student.call("GET", f"/images/{name}/json").status == 404
    finally:
        engine.remove_image(name, force=True)
