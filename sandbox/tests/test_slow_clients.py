"""What a client that stops reading can hold of the web server, served as deploy/supervisord.conf serves it."""

import configparser
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from django.conf import settings
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import tutorial.asgi
from sandbox import protocol

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SCRIPT = "/static/vendor/xterm/xterm.js"


def _deployed_protocols() -> tuple[str, str]:
    """The HTTP and websocket protocols of the web program's uvicorn command line."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(Path(settings.BASE_DIR) / "deploy" / "supervisord.conf")
    words = shlex.split(config["program:web"]["command"])
    return words[words.index("--http") + 1], words[words.index("--ws") + 1]


@pytest.fixture
def deployed_site(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The site under uvicorn with the deployed protocols, dropping a client that acknowledges nothing for 2 s."""
    monkeypatch.setattr(tutorial.asgi, "CLIENT_STALL_SECONDS", 2.0)
    http, ws = _deployed_protocols()
    server = uvicorn.Server(
        uvicorn.Config(tutorial.asgi.application, host="127.0.0.1", port=0, http=http, ws=ws, lifespan="off")
    )
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    serving.join(timeout=10)


def _asleep_after_asking(host: str, path: str) -> socket.socket:
    """A client that asks for `path` and reads nothing, over a socket with a small receive buffer and a real
    network's segment size (on loopback the kernel would hold megabytes for the socket)."""
    address, port = host.rsplit(":", 1)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1448)
    client.connect((address, int(port)))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return client


def _read_all(client: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, and whether the connection was reset instead."""
    client.settimeout(10)
    received = bytearray()
    try:
        while data := client.recv(65536):
            received += data
    except ConnectionResetError:
        return bytes(received), True
    return bytes(received), False


def test_a_client_that_stops_reading_a_script_is_dropped_by_the_server(deployed_site: str) -> None:
    script = (Path(settings.JAVASCRIPT_DIR) / "xterm" / "xterm.js").read_bytes()
    with (
        _asleep_after_asking(deployed_site, SCRIPT) as awake,
        _asleep_after_asking(deployed_site, SCRIPT) as asleep,
    ):
        received, reset = _read_all(awake)
        assert not reset and received.endswith(script)
        time.sleep(tutorial.asgi.CLIENT_STALL_SECONDS + 3)
        # It wakes up: what its socket held, then nothing, for the server let the connection go.
        received, reset = _read_all(asleep)
        assert reset and len(received) < len(script)


def test_terminal_websockets_are_upgraded_on_those_sockets(deployed_site: str) -> None:
    headers = {"Origin": f"http://{deployed_site}"}
    url = f"ws://{deployed_site}/ws/sandbox/1/terminal/"
    with pytest.raises(ConnectionClosed) as closed, connect(url, additional_headers=headers) as ws:
        ws.send(protocol.hello_frame(has_screen=False, offset=0))
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == protocol.CLOSE_FORBIDDEN
