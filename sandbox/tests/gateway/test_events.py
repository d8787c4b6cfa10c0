"""What the student did, published on Redis for the rest of the site."""

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from django.conf import settings

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


@contextmanager
def _subscribed(student: StudentSession) -> Iterator[Any]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    pubsub = client.pubsub()
    pubsub.subscribe(f"{settings.SANDBOX_NAMESPACE}:events:{student.session_id}")
    try:
        pubsub.get_message(timeout=1)
        yield pubsub
    finally:
        pubsub.close()
        client.close()


def _collect(pubsub: Any, wanted: set[str], timeout: float = 20) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not wanted <= {e["type"] for e in seen}:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            seen.append(json.loads(message["data"]))
    return seen


def test_container_and_image_events(student: StudentSession, curated_image: str) -> None:
    with _subscribed(student) as pubsub:
        container = student.run(curated_image, ["true"], name="web")
        assert student.call("POST", f"/containers/{container}/wait").status == 200
        assert student.call("POST", "/commit?container=web&repo=snap&tag=v1").status == 201
        assert student.call("POST", "/images/snap:v1/tag?repo=snap&tag=v2").status == 201
        assert student.call("DELETE", "/containers/web").status == 204
        assert student.call("DELETE", "/images/snap:v2").status == 200
        wanted = {
            "container.created",
            "container.started",
            "container.stopped",
            "container.removed",
            "image.committed",
            "image.tagged",
            "image.removed",
        }
        seen = _collect(pubsub, wanted)
        assert wanted <= {e["type"] for e in seen}, seen
        created = next(e for e in seen if e["type"] == "container.created")
        assert created["name"] == "web" and created["image"] == curated_image and created["id"] == container
        assert next(e for e in seen if e["type"] == "image.tagged")["tag"] == "snap:v2"
        assert next(e for e in seen if e["type"] == "container.stopped")["exit_code"] == 0


def test_image_built_event(student: StudentSession, curated_image: str) -> None:
    with _subscribed(student) as pubsub:
        answer = student.build(f"FROM {curated_image}\nRUN echo built > /built\n", tag="myapp")
        assert answer.status == 200 and b"Successfully built" in answer.body, answer.body
        image_id = student.call("GET", "/v1.41/images/myapp/json").json()["Id"]
        seen = _collect(pubsub, {"image.built"})
        built = next(e for e in seen if e["type"] == "image.built")
        assert built["id"] == image_id
        assert built["tags"] == ["myapp:latest"]
