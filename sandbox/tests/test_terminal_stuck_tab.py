"""A tab that stops reading its websocket, for real: a raw client over a socket with a small receive buffer,
against the site served by uvicorn and a shell on the engine that floods output."""

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator

import docker
import pytest
from django.conf import settings
from django.test import Client, override_settings
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from lessons.models import Lesson
from sandbox import protocol, terminal
from sandbox.models import Sandbox, SandboxState

from .test_terminal_live import Terminal, _start, _ws, wait_until_ended

pytestmark = [pytest.mark.engine, pytest.mark.redis, pytest.mark.slow, pytest.mark.usefixtures("engine_cleanup")]

# More output in flight than a tab's socket and the server's buffers for it hold (some 200 KiB here), so that
# what the server waits on is the socket of the tab that stopped reading, not the window.
WIDE_WINDOW = 1024 * 1024


class StuckTab:
    """A terminal websocket whose reading the test stops and starts, as a frozen tab or a suspended laptop does:
    once it stops, what the server sends fills the socket's small receive buffer and then the server's."""

    def __init__(self, host: str, pk: int, client: Client) -> None:
        address, port = host.rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # The segment size of a real network: on loopback the kernel would hold megabytes for the socket.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1448)
        self.sock.connect((address, int(port)))
        self.ws = ClientProtocol(parse_uri(f"ws://{host}/ws/sandbox/{pk}/terminal/"), max_size=None)
        request = self.ws.connect()
        request.headers["Origin"] = f"http://{host}"
        request.headers["Cookie"] = f"sessionid={client.cookies['sessionid'].value}"
        self.ws.send_request(request)
        self._flush()
        self.output = bytearray()
        self.states: list[str] = []
        self.close_code: int | None = None
        self._read_until(lambda: self.ws.state.name == "OPEN", within=10)

    def _flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.sock.sendall(data)

    def send(self, frame: bytes) -> None:
        self.ws.send_binary(frame)
        self._flush()

    def _read_until(self, check: Callable[[], bool], *, within: float) -> None:
        deadline = time.monotonic() + within
        while not check():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; states={self.states} output={bytes(self.output[-200:])!r}")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                self.ws.receive_eof()
            else:
                self.ws.receive_data(data)
            for event in self.ws.events_received():
                self._take(event)
            self._flush()
            if not data:
                return

    def _take(self, event: object) -> None:
        if not isinstance(event, Frame):
            return
        if event.opcode == Opcode.CLOSE and self.ws.close_rcvd is not None:
            self.close_code = self.ws.close_rcvd.code
        elif event.opcode == Opcode.BINARY and event.data[0] == protocol.STATUS:
            self.states.append(bytes(event.data[1:]).decode())
        elif event.opcode == Opcode.BINARY and event.data[0] in (protocol.OUTPUT, protocol.REPLAY):
            self.output += event.data[9:]

    def read_until_output(self, marker: bytes, *, within: float = 20) -> None:
        self._read_until(lambda: marker in self.output, within=within)

    def read_until_closed(self, *, within: float = 20) -> int | None:
        """Read again, as a tab that wakes up does, until the server closes the websocket; its close code."""
        self._read_until(lambda: self.close_code is not None, within=within)
        return self.close_code

    def unread_bytes(self) -> int:
        return int(struct.unpack("i", fcntl.ioctl(self.sock, termios.FIONREAD, b"\0\0\0\0"))[0])

    def __enter__(self) -> "StuckTab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@pytest.fixture
def lesson() -> Lesson:
    return Lesson.objects.create(slug="stuck", title="Stuck", body="text", image="layercake/shell:latest")


def _ready(sandbox: Sandbox) -> None:
    deadline = time.monotonic() + 60
    while Sandbox.objects.get(pk=sandbox.pk).state != SandboxState.READY:
        assert time.monotonic() < deadline, "the sandbox did not become ready"
        time.sleep(0.2)


@contextlib.contextmanager
def _sandbox_in_a_tab(live_asgi: str, lesson: Lesson) -> Iterator[tuple[Client, Sandbox, StuckTab]]:
    """A new sandbox, open in a tab that shows its prompt; the sandbox is stopped after."""
    client = Client()
    sandbox = _start(client, lesson)
    _ready(sandbox)
    with StuckTab(live_asgi, sandbox.pk, client) as tab:
        tab.send(protocol.hello_frame(has_screen=False, offset=0))
        tab.send(protocol.resize_frame(100, 30))
        tab.read_until_output(b"$ ")
        yield client, sandbox, tab
    response = client.post(f"/sandbox/{sandbox.pk}/stop/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    wait_until_ended(sandbox)


@override_settings(TERMINAL_WINDOW_BYTES=WIDE_WINDOW, TERMINAL_REPLAY_BYTES=WIDE_WINDOW)
def test_a_new_tab_takes_over_at_once_from_a_tab_that_stopped_reading(live_asgi: str, lesson: Lesson) -> None:
    with _sandbox_in_a_tab(live_asgi, lesson) as (client, sandbox, stuck):
        stuck.send(protocol.input_frame(b"yes flood-of-output\r"))
        stuck.read_until_output(b"flood-of-output\r\nflood-of-output\r\n")
        # The server fills the tab's socket, then its own buffers, and then waits for the tab to read.
        time.sleep(1.5)
        assert stuck.unread_bytes() > 0
        took = asyncio.run(_new_tab_runs_a_command(live_asgi, sandbox, client))
        assert took < 5, f"the new tab took {took:.1f} s to get a prompt and an echo"
        # The old tab wakes up: it gets what its socket held, then hears the terminal is open elsewhere.
        assert stuck.read_until_closed() == protocol.CLOSE_ELSEWHERE


async def _new_tab_runs_a_command(live_asgi: str, sandbox: Sandbox, client: Client) -> float:
    """How long a new tab takes to get the terminal, stop what runs in it and see a command's answer."""
    began = time.monotonic()
    async with _ws(live_asgi, sandbox.pk, client) as ws:
        term = Terminal(ws)
        await term.hello()
        await term.until(lambda t: t.state() == "ready" and t.replays == 1, within=5)
        await ws.send(protocol.input_frame(b"\x03"))
        mark = len(term.screen)
        await ws.send(protocol.input_frame(b"echo took-over-$((6*7))\r"))
        await term.until(lambda t: b"took-over-42" in bytes(t.screen[mark:]), within=5)
    return time.monotonic() - began


def test_a_tab_that_stopped_reading_is_let_go_and_the_program_runs_on(
    live_asgi: str, lesson: Lesson, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terminal, "STALL_TIMEOUT", 2.0)
    with _sandbox_in_a_tab(live_asgi, lesson) as (_, sandbox, tab):
        # Far more output than the window and every buffer hold, then a mark the test looks for on the engine.
        tab.send(protocol.input_frame(b"seq 1 4000000; touch /tmp/flood-done\r"))
        tab.read_until_output(b"\r\n100\r\n")
        began = time.monotonic()
        _wait_for_file(sandbox, "/tmp/flood-done", within=30)
        assert time.monotonic() - began > terminal.STALL_TIMEOUT, "the tab was let go only once it stalled"
        # The tab wakes up: it gets what its socket held, then is told to come back for the rest.
        assert tab.read_until_closed() == protocol.CLOSE_SLOW


def _wait_for_file(sandbox: Sandbox, path: str, *, within: float) -> None:
    """Wait until `path` exists in the sandbox's container, asking the engine."""
    engine = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL)
    deadline = time.monotonic() + within
    try:
        container = engine.containers.get(Sandbox.objects.get(pk=sandbox.pk).backend_state["container"])
        while container.exec_run(["test", "-e", path]).exit_code != 0:
            assert time.monotonic() < deadline, "the program waited on a tab that does not read"
            time.sleep(0.5)
    finally:
        engine.close()
