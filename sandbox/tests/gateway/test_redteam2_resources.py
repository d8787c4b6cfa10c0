"""One student growing what the gateway reads for every student: the engine's list of images is read whole by
nearly every command, so one sandbox's names and images are counted."""

from typing import Any
from urllib.parse import quote

import pytest

from sandbox.gateway.session import MAX_IMAGE_TAGS, MAX_VOLUMES

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _tag(student: StudentSession, source: str, repo: str, tag: str = "latest") -> Any:
    return student.call("POST", f"/v1.41/images/{quote(source, safe=':')}/tag?repo={repo}&tag={tag}")


def test_a_sandbox_gives_its_images_a_bounded_number_of_names(student_factory: Any, curated_image: str) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    built = alice.build(f"FROM {curated_image}\nLABEL lesson=tags\n", tag="mine:v1")
    assert built.status == 200, built.body
    for index in range(MAX_IMAGE_TAGS - 1):
        assert _tag(alice, "mine:v1", f"name{index}").status == 201
    refused = _tag(alice, "mine:v1", "one-too-many")
    assert refused.status == 403 and "at most" in refused.message, refused.body
    refused = _tag(alice, curated_image, "curated-copy")
    assert refused.status == 403, refused.body
    assert alice.build(f"FROM {curated_image}\n", tag="another").status == 403
    # Naming again what is already named is no new name; other sandboxes are not counted against it.
    assert _tag(alice, "mine:v1", "name0").status == 201
    assert _tag(bob, curated_image, "bobs").status == 201
    removed = alice.call("DELETE", "/v1.41/images/name0:latest")
    assert removed.status == 200, removed.body
    assert _tag(alice, "mine:v1", "one-more").status == 201


def test_a_sandbox_holds_a_bounded_number_of_volumes(student_factory: Any, curated_image: str) -> None:
    alice: StudentSession = student_factory()
    for index in range(MAX_VOLUMES):
        created = alice.call("POST", "/v1.41/volumes/create", {"Name": f"data{index}"})
        assert created.status == 201, created.body
    refused = alice.call("POST", "/v1.41/volumes/create", {"Name": "one-too-many"})
    assert refused.status == 403 and "at most" in refused.message, refused.body
    assert alice.call("POST", "/v1.41/volumes/create", {}).status == 403
    run = alice.call(
        "POST", "/v1.41/containers/create", {"Image": curated_image, "HostConfig": {"Binds": ["fresh:/data"]}}
    )
    assert run.status == 403, run.body
    # What exists is used as before, and a volume removed makes room.
    assert alice.call("POST", "/v1.41/volumes/create", {"Name": "data0"}).status == 201
    reused = alice.call(
        "POST", "/v1.41/containers/create", {"Image": curated_image, "HostConfig": {"Binds": ["data1:/data"]}}
    )
    assert reused.status == 201, reused.body
    assert alice.call("DELETE", "/v1.41/volumes/data2").status == 204
    assert alice.call("POST", "/v1.41/volumes/create", {"Name": "one-more"}).status == 201
