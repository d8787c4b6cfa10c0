"""What one student could do to the site, or through it to the shared engine and to other students, refused."""

import asyncio
import time

import docker
import pytest
from django.conf import settings
from django.test import Client

from lessons.models import Lesson
from sandbox import protocol
from sandbox.tests.test_terminal_live import Terminal, _start, _ws


@pytest.fixture
def lesson() -> Lesson:
    return Lesson.objects.create(slug="live", title="Live", body="text", image="layercake/shell:latest")


def _engine_resizes(session_id: int, since: float) -> int:
    engine = docker.APIClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=30)
    filters = {"event": "resize", "label": [f"layercake.session={session_id}"]}
    try:
        events = engine.events(since=int(since), until=int(time.time()) + 1, filters=filters, decode=True)
        return sum(1 for _ in events)
    finally:
        engine.close()


@pytest.mark.engine
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.usefixtures("engine_cleanup")
def test_a_flood_of_resizes_reaches_the_engine_coalesced(live_asgi: str, lesson: Lesson) -> None:
    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> float:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await term.until(lambda t: t.state() == "ready", within=60)
            await term.run("stty size", b"30 100")
            started = time.time()
            for i in range(500):
                await ws.send(protocol.resize_frame(80 + i % 40, 24 + i % 10))
            await ws.send(protocol.resize_frame(123, 45))
            await term.run("sleep 1; stty size", b"45 123")
            return started

    started = asyncio.run(session())
    assert 1 <= _engine_resizes(sandbox.pk, started - 1) <= 12
