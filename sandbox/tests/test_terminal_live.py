"""The spine for real: a Celery worker launches the sandbox on the engine, uvicorn serves the websocket, and a
websocket client drives the shell."""

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import docker
import pytest
from django.conf import settings
from django.test import Client, override_settings
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
        # Each deadlines frame: the reasons near, with when each comes on this test's monotonic clock.
        self.deadlines: list[dict[str, float]] = []
        self.offset = 0
        self.replays = 0
        # What the gateway published of the student's doings, in order.
        self.events: list[dict[str, object]] = []

    async def hello(self, *, has_screen: bool = False, cols: int = 100, rows: int = 30) -> None:
        await self.ws.send(protocol.hello_frame(has_screen=has_screen, offset=self.offset))
        await self.ws.send(protocol.resize_frame(cols, rows))

    async def ready(self) -> "Terminal":
        """Open the terminal as a new tab does, once its sandbox is ready."""
        await self.hello()
        await self.until(lambda t: t.state() == "ready", within=60)
        return self

    async def _take(self, frame: bytes) -> None:
        kind, body = frame[0], frame[1:]
        if kind == protocol.STATUS:
            self.states.append(json.loads(body))
        elif kind == protocol.DEADLINES:
            now = time.monotonic()
            self.deadlines.append({d["reason"]: now + d["remaining"] for d in json.loads(body)["deadlines"]})
        elif kind == protocol.EVENT:
            self.events.append(json.loads(body))
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
            term = await Terminal(ws).ready()
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
            term = await Terminal(ws).ready()
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
            term = await Terminal(ws).ready()
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
            term = await Terminal(ws).ready()
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


def _seconds_to(when: datetime) -> float:
    from django.utils import timezone

    return (when - timezone.now()).total_seconds()


def _sandbox(pk: int) -> Sandbox:
    return Sandbox.objects.get(pk=pk)


@override_settings(SANDBOX_IDLE_TIMEOUT=12, SANDBOX_IDLE_WARNING_LEAD=8)
def test_the_page_is_warned_before_the_idle_timeout_and_input_withdraws_it(live_asgi: str, lesson: Lesson) -> None:
    from sandbox.services import sandbox_reap
    from sandbox.tasks import sandbox_reap_task

    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = await Terminal(ws).ready()
            told = len(term.deadlines)
            await term.run("echo typed-$((1+1))", b"typed-2")
            await term.until(lambda t: len(t.deadlines) > told and t.deadlines[-1] == {})

            # No input for 4 s: 8 s before the timeout, the warning comes unasked, counting to the reaper's own
            # deadline.
            await term.until(lambda t: "idle" in t.deadlines[-1], within=10)
            idle_at = (await asyncio.to_thread(_sandbox, sandbox.pk)).last_activity_at + timedelta(seconds=12)
            assert abs(term.deadlines[-1]["idle"] - time.monotonic() - _seconds_to(idle_at)) < 1
            assert 0 < term.deadlines[-1]["idle"] - time.monotonic() <= 8

            # A key withdraws it, however recently input was written before.
            await ws.send(protocol.input_frame(b" "))
            await term.until(lambda t: t.deadlines[-1] == {}, within=5)
            await term.until(lambda t: "idle" in t.deadlines[-1], within=10)

        # A new tab opened meanwhile (or the same one reconnecting) is told at once.
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            tab = Terminal(ws)
            await tab.hello()
            await tab.until(lambda t: bool(t.deadlines), within=10)
            assert "idle" in tab.deadlines[0]

            # The reaper leaves the sandbox alone until the moment the page counts to.
            deadline = tab.deadlines[-1]["idle"]
            await asyncio.sleep(deadline - time.monotonic() - 2)
            assert (await asyncio.to_thread(sandbox_reap)).idle == []
            await asyncio.sleep(deadline - time.monotonic() + 0.5)
            sandbox_reap_task.delay()
            assert await tab.closed() == protocol.CLOSE_ENDED
            assert tab.states[-1]["reason"] == "idle"

    asyncio.run(session())
    wait_until_ended(sandbox)


@override_settings(SANDBOX_MAX_AGE=30, SANDBOX_MAX_AGE_WARNING_LEAD=25)
def test_the_page_is_warned_before_the_maximum_age_and_input_does_not_put_it_off(
    live_asgi: str, lesson: Lesson
) -> None:
    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = await Terminal(ws).ready()
            await term.until(lambda t: bool(t.deadlines) and "max_age" in t.deadlines[-1], within=25)
            expires_at = term.deadlines[-1]["max_age"]
            assert abs(expires_at - time.monotonic() - _seconds_to(sandbox.expires_at)) < 1
            assert list(term.deadlines[-1]) == ["max_age"]

            told = len(term.deadlines)
            await term.run("echo typed-$((2+2))", b"typed-4")
            await term.until(lambda t: len(t.deadlines) > told, within=5)
            assert abs(term.deadlines[-1]["max_age"] - expires_at) < 1, "typing does not move the maximum age"

            # The sandbox ends when the countdown said, and the page is told why.
            assert await term.closed(within=30) == protocol.CLOSE_ENDED
            assert abs(time.monotonic() - expires_at) < 5
            assert term.states[-1]["reason"] == "max_age"

    asyncio.run(session())
    wait_until_ended(sandbox)
