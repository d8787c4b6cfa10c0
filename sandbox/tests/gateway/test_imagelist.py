"""The gateway's shared copy of the engine's image list: asked for once while nothing changes the images, and
never stale after a change, whether the gateway made it or anyone else did on the engine."""

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import docker
import pytest
from django.conf import settings

from sandbox.gateway.engine import Engine
from sandbox.gateway.http import Response
from sandbox.gateway.imagelist import ImageList

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine]


class CountingEngine(Engine):
    """The real engine, counting the image lists it is asked for."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path)
        self.lists = 0

    async def call(self, method: str, path: str, **kwargs: Any) -> Response:
        if path == "/images/json":
            self.lists += 1
        return await super().call(method, path, **kwargs)


def _tags(entries: list[dict[str, Any]]) -> set[str]:
    return {tag for entry in entries for tag in entry.get("RepoTags") or []}


async def _until(check: Any) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{check.__name__}: not within 10 s")


@pytest.fixture
async def followed() -> AsyncIterator[tuple[ImageList, CountingEngine]]:
    engine = CountingEngine(settings.SANDBOX_DOCKER_URL.removeprefix("unix://"))
    images = ImageList(engine)
    task = asyncio.create_task(images.follow())

    async def following() -> bool:
        return images.following

    await _until(following)
    try:
        yield images, engine
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_list_is_asked_for_once_until_the_engine_changes_it(
    followed: tuple[ImageList, CountingEngine], engine: docker.APIClient, curated_image: str
) -> None:
    images, counting = followed
    first = await images.entries()
    assert await images.entries() == first and counting.lists == 1
    # Each caller gets its own copy to change.
    first[0]["RepoTags"] = ["changed"]
    assert (await images.entries())[0].get("RepoTags") != ["changed"]
    assert counting.lists == 1

    # Changed on the engine by someone else: seen as soon as the engine says so.
    tag = f"{settings.SANDBOX_NAMESPACE}-elsewhere-{secrets.token_hex(3)}"
    engine.tag(curated_image, tag, "v1")
    container = engine.create_container(
        curated_image,
        command=["true"],
        labels={"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE},
    )
    committed = ""
    try:

        async def tagged() -> bool:
            return f"{tag}:v1" in _tags(await images.entries())

        await _until(tagged)
        # A commit with no name makes an image that no image event tells of.
        committed = engine.commit(container["Id"])["Id"]

        async def listed() -> bool:
            return committed in {entry["Id"] for entry in await images.entries()}

        await _until(listed)
        engine.remove_image(f"{tag}:v1")

        async def untagged() -> bool:
            return f"{tag}:v1" not in _tags(await images.entries())

        await _until(untagged)
        lists = counting.lists
        await images.entries()
        assert counting.lists == lists
    finally:
        engine.remove_container(container["Id"], force=True)
        for ref in (committed, f"{tag}:v1"):
            if ref:
                with contextlib.suppress(docker.errors.NotFound):
                    engine.remove_image(ref, force=True)


async def test_nothing_is_kept_while_a_change_is_under_way_or_the_engine_is_not_followed(
    followed: tuple[ImageList, CountingEngine],
) -> None:
    images, counting = followed
    await images.entries()
    with images.changing():
        await images.entries()
        await images.entries()
    assert counting.lists == 3
    await images.entries()
    await images.entries()
    assert counting.lists == 4

    # Nor past its age, whatever the events say.
    images.max_age = 0.5
    await images.entries()
    lists = counting.lists
    await asyncio.sleep(0.6)
    await images.entries()
    await images.entries()
    assert counting.lists == lists + 1

    unfollowed = CountingEngine(settings.SANDBOX_DOCKER_URL.removeprefix("unix://"))
    fresh = ImageList(unfollowed)
    await fresh.entries()
    await fresh.entries()
    assert unfollowed.lists == 2


def test_a_students_change_is_in_their_next_command(student: StudentSession, curated_image: str) -> None:
    """Through the gateway process, which follows the engine's events: each answer after a change shows it."""
    for number in range(5):
        name = f"mine{number}"
        assert student.call("POST", f"/images/{curated_image}/tag?repo={name}&tag=v1").status == 201
        listed = {tag for image in student.call("GET", "/images/json").json() for tag in image["RepoTags"] or []}
        assert f"{name}:v1" in listed, listed
        assert student.call("GET", f"/images/{name}:v1/json").status == 200
        assert student.call("DELETE", f"/images/{name}:v1").status == 200
        listed = {tag for image in student.call("GET", "/images/json").json() for tag in image["RepoTags"] or []}
        assert f"{name}:v1" not in listed, listed
        assert student.call("GET", f"/images/{name}:v1/json").status == 404
