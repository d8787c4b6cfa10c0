"""The spine for real: a Celery worker launches the sandbox on the engine, uvicorn serves the websocket, and a
websocket client drives the shell."""

import asyncio
import json
import time
from collections.abc import Callable

import docker
import pytest
from django.conf import settings
from django.test import Client
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from lessons.models import Lesson
from sandbox import protocol
from sandbox.models import Sandbox, SandboxState
from sandbox.owners import SESSION_KEY
from sandbox.terminal import RESIZE_INTERVAL

pytestmark = [pytest.mark.engine, pytest.mark.redis, pytest.mark.slow, pytest.mark.usefixtures("engine_cleanup")]


class Terminal:
    """A websocket client speaking the terminal protocol, collecting what the shell prints."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.screen = bytearray()
        self.states: list[dict[str, str]] = []
        self.offset = 0
        self.replays = 0

    async def hello(self, *, has_screen: bool = False, cols: int = 100, rows: int = 30) -> None:
        await self.ws.send(protocol.hello_frame(has_screen=has_screen, offset=self.offset))
        await self.ws.send(protocol.resize_frame(cols, rows))

    async def _take(self, frame: bytes) -> None:
        kind, body = frame[0], frame[1:]
        if kind == protocol.STATUS:
            self.states.append(json.loads(body))
        elif kind in (protocol.OUTPUT, protocol.REPLAY):
            offset, data = int.from_bytes(body[:8], "big"), body[8:]
            if kind == protocol.REPLAY:
                self.replays += 1
                self.screen = bytearray()
            self.screen += data
            self.offset = offset + len(data)
            await self.ws.send(protocol.ack_frame(self.offset))

    async def until(self, check: Callable[["Terminal"], bool], *, within: float = 20) -> None:
        deadline = time.monotonic() + within
        while not check(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; states={self.states} screen={bytes(self.screen[-400:])!r}")
            frame = await asyncio.wait_for(self.ws.recv(), remaining)
            assert isinstance(frame, bytes), "the server sends binary frames only"
            await self._take(frame)

    async def run(self, command: str, expect: bytes) -> None:
        mark = len(self.screen)
        await self.ws.send(protocol.input_frame(command.encode() + b"\r"))
        await self.until(lambda t: expect in bytes(t.screen[mark:]))

    def state(self) -> str | None:
        return self.states[-1]["state"] if self.states else None

    async def closed(self, *, within: float = 20) -> int | None:
        """Take frames until the server closes; the close code."""
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frame = await asyncio.wait_for(self.ws.recv(), within)
                assert isinstance(frame, bytes)
                await self._take(frame)
        return closed.value.rcvd.code if closed.value.rcvd is not None else None


def wait_until_ended(sandbox: Sandbox, *, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while Sandbox.objects.get(pk=sandbox.pk).state != SandboxState.ENDED:
        assert time.monotonic() < deadline, "the sandbox did not end"
        time.sleep(0.2)


def _ws(host: str, pk: int, client: Client | None) -> "connect":
    headers = {"Origin": f"http://{host}"}
    if client is not None:
        headers["Cookie"] = f"sessionid={client.cookies['sessionid'].value}"
    return connect(f"ws://{host}/ws/sandbox/{pk}/terminal/", additional_headers=headers, max_size=2**22)


@pytest.fixture
def lesson() -> Lesson:
    return Lesson.objects.create(slug="live", title="Live", body="text", image="layercake/shell:latest")


def _start(client: Client, lesson: Lesson) -> Sandbox:
    response = client.post("/sandbox/start/", {"lesson": lesson.slug}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    sandbox = Sandbox.objects.get(lesson=lesson)
    return sandbox


def _engine_objects() -> list[str]:
    engine = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL)
    mine = {"label": f"layercake.namespace={settings.SANDBOX_NAMESPACE}"}
    try:
        return [c["Names"][0] for c in engine.api.containers(all=True, filters=mine)] + [
            n["Name"] for n in engine.api.networks(filters=mine)
        ]
    finally:
        engine.close()


def test_start_type_resize_reconnect_and_stop(live_asgi: str, lesson: Lesson) -> None:
    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await term.until(lambda t: t.state() == "ready", within=60)
            seen = [s["state"] for s in term.states]
            assert seen[-1] == "ready"
            await term.run("echo $((6*7))", b"42")
            await term.run("stty size", b"30 100")
            await ws.send(protocol.resize_frame(132, 43))
            # The engine hears of a size at most once in RESIZE_INTERVAL: this one comes at the interval's end.
            await term.run(f"sleep {RESIZE_INTERVAL * 2}; stty size", b"43 132")
            await term.run("export MARK=kept; (sleep 1; echo late-$((3*3))) & echo bg-$((1+1))", b"bg-2")
            offset = term.offset

        # Gone for a moment: the shell goes on, and the screen comes back exactly once.
        await asyncio.sleep(1.5)
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            again = Terminal(ws)
            again.offset = offset
            await again.hello(has_screen=True)
            await again.until(lambda t: b"late-9" in t.screen)
            assert again.replays == 0
            assert bytes(again.screen).count(b"late-9") == 1
            await again.run("echo ${MARK}-$((2+3))", b"kept-5")

        # A new tab gets a replay of the screen.
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            fresh = Terminal(ws)
            await fresh.hello()
            await fresh.until(lambda t: t.replays == 1 and b"late-9" in t.screen)
            assert bytes(fresh.screen).count(b"42\r\n") == 1

    asyncio.run(session())

    response = client.post(f"/sandbox/{sandbox.pk}/stop/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    wait_until_ended(sandbox)
    assert _engine_objects() == []


def test_someone_elses_terminal_is_refused_without_data(live_asgi: str, lesson: Lesson) -> None:
    owner = Client()
    sandbox = _start(owner, lesson)
    stranger = Client()
    # A visitor who owns sandboxes of their own, as starting one leaves them.
    session = stranger.session
    session[SESSION_KEY] = "anon-someone-else"
    session.save()

    async def attempt(client: Client | None) -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            received: list[object] = []
            with pytest.raises(ConnectionClosed) as closed:
                await ws.send(protocol.hello_frame(has_screen=False, offset=0))
                received.append(await asyncio.wait_for(ws.recv(), 10))
            assert received == []
            assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.CLOSE_FORBIDDEN

    asyncio.run(attempt(None))
    asyncio.run(attempt(stranger))


def test_malformed_frames_close_cleanly_and_absurd_sizes_are_ignored(live_asgi: str, lesson: Lesson) -> None:
    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await term.until(lambda t: t.state() == "ready", within=60)
            await ws.send(protocol.resize_frame(0, 65535))
            await ws.send(protocol.resize_frame(65535, 65535))
            await term.run("stty size", b"30 100")
            await ws.send(b"\x7fnot a frame")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.CLOSE_PROTOCOL

        async with _ws(live_asgi, sandbox.pk, client) as ws:
            await ws.send("text frames are not part of the protocol")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.CLOSE_PROTOCOL

        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await ws.send(protocol.input_frame(b"x" * (settings.TERMINAL_MAX_FRAME_BYTES + 10)))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.CLOSE_PROTOCOL

        # Far past the limit, the server refuses the message before holding it whole.
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await ws.send(protocol.input_frame(b"x" * (16 * settings.TERMINAL_MAX_FRAME_BYTES)))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    asyncio.run(session())


def test_a_foreign_origin_is_refused(live_asgi: str, lesson: Lesson) -> None:
    client = Client()
    sandbox = _start(client, lesson)
    headers = {"Origin": "http://evil.example", "Cookie": f"sessionid={client.cookies['sessionid'].value}"}

    async def attempt() -> None:
        from websockets.exceptions import InvalidStatus

        with pytest.raises((InvalidStatus, ConnectionClosed)):
            async with connect(
                f"ws://{live_asgi}/ws/sandbox/{sandbox.pk}/terminal/", additional_headers=headers
            ) as ws:
                await ws.send(protocol.hello_frame(has_screen=False, offset=0))
                await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(attempt())


def test_when_the_shell_exits_the_page_is_told_why_and_nothing_is_left(live_asgi: str, lesson: Lesson) -> None:
    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await term.until(lambda t: t.state() == "ready", within=60)
            await ws.send(protocol.input_frame(b"exit\r"))
            assert await term.closed() == protocol.CLOSE_ENDED
            assert term.states[-1]["reason"] == "exited"
            assert term.states[-1]["message"] == "The shell exited."

    asyncio.run(session())
    wait_until_ended(sandbox)
    assert _engine_objects() == []


def test_an_idle_sandbox_is_ended_by_the_reaper_and_the_page_is_told(live_asgi: str, lesson: Lesson) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from sandbox.tasks import sandbox_reap_task

    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await term.until(lambda t: t.state() == "ready", within=60)
            await asyncio.to_thread(
                lambda: Sandbox.objects.filter(pk=sandbox.pk).update(
                    last_activity_at=timezone.now() - timedelta(hours=1)
                )
            )
            sandbox_reap_task.delay()
            assert await term.closed() == protocol.CLOSE_ENDED
            assert {"state": "stopping", "reason": "idle", "message": "The sandbox was idle for too long."} in [
                {key: status[key] for key in ("state", "reason", "message")} for status in term.states
            ]

    asyncio.run(session())
    wait_until_ended(sandbox)
    assert _engine_objects() == []
    assert "The sandbox was idle for too long." in client.get(f"/sandbox/{sandbox.pk}/").content.decode()
