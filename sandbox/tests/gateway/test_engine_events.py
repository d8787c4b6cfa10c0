"""The gateway's own following of the engine's events (its image list, and what it publishes of the students'
containers): no event is missed, in the instant between asking for the stream and the engine subscribing it, or
while a lost stream is down, and none is delivered twice."""

import asyncio
import contextlib
import json
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import docker
import pytest
from django.conf import settings

from sandbox.gateway.engine import Engine, follow_events

pytestmark = [pytest.mark.gateway, pytest.mark.engine]


class CuttableSocket:
    """A socket in front of the engine's: its connections can be held before they reach the engine, and cut."""

    def __init__(self, target: str, path: Path) -> None:
        self.target = target
        self.path = path
        self.held = asyncio.Event()
        self.held.set()
        self.waiting = asyncio.Event()
        self.refusing = False
        self.connections: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> "CuttableSocket":
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def cut(self) -> None:
        for writer in self.connections:
            writer.close()
        self.connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        self.connections.append(writer)
        self.waiting.set()
        await self.held.wait()
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.target)
        self.connections.append(upstream_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within 10 s")


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableSocket]:
    with tempfile.TemporaryDirectory() as directory:
        async with CuttableSocket(
            settings.SANDBOX_DOCKER_URL.removeprefix("unix://"), Path(directory) / "engine.sock"
        ) as socket:
            yield socket


async def test_no_event_is_missed_or_repeated(
    proxy: CuttableSocket, engine: docker.APIClient, curated_image: str
) -> None:
    marker = secrets.token_hex(6)
    labels = {"layercake.managed": "1", "layercake.test-events": marker}
    made: list[str] = []

    async def create(name: str) -> None:
        full = f"{settings.SANDBOX_NAMESPACE}-events-{marker}-{name}"
        await asyncio.to_thread(engine.create_container, curated_image, ["true"], name=full, labels=labels)
        made.append(full)

    seen: list[str] = []
    opened = 0
    down = 0

    def connected() -> None:
        nonlocal opened
        opened += 1

    def lost() -> None:
        nonlocal down
        down += 1

    async def event(line: bytes) -> None:
        seen.append(json.loads(line)["Actor"]["Attributes"]["name"].rsplit("-", 1)[-1])

    def follow() -> Coroutine[Any, Any, None]:
        return follow_events(
            Engine(str(proxy.path)),
            {"type": ["container"], "event": ["create"], "label": [f"layercake.test-events={marker}"]},
            connected=connected,
            event=event,
            lost=lost,
        )

    try:
        # Before the stream is first asked for: not delivered, another follower's business.
        await create("before")
        await asyncio.sleep(0.05)
        # Asked for, not yet subscribed: the request is held on its way to the engine.
        proxy.held.clear()
        task = asyncio.create_task(follow())
        try:
            await asyncio.wait_for(proxy.waiting.wait(), 10)
            await create("asked")
            proxy.held.set()
            await _until(lambda: opened == 1 and seen == ["asked"], "the event made as the stream was asked for")
            await create("live")
            await _until(lambda: seen == ["asked", "live"], "the live event")
            # The stream is lost, and reconnecting fails for a while: what happens meanwhile comes with the next.
            proxy.refusing = True
            proxy.cut()
            await _until(lambda: down >= 1, "the lost stream")
            await create("down")
            await asyncio.sleep(1.5)
            proxy.refusing = False
            await _until(lambda: opened == 2 and len(seen) == 3, "the event made while the stream was down")
            await create("after")
            await _until(lambda: len(seen) == 4, "the live event after reconnecting")
            await asyncio.sleep(0.3)
            assert seen == ["asked", "live", "down", "after"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        for name in made:
            await asyncio.to_thread(engine.remove_container, name, force=True)
