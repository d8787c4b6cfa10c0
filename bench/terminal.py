"""The lesson terminal's figures, each beside its floor measured in the same run.

    .venv/bin/python bench/terminal.py [--runs 10] [--samples 200]

It runs the real thing: a Celery worker, the gateway and uvicorn as child processes (as `./layercake up` runs
them), a Redis, the engine, and a websocket client speaking the terminal protocol, in the image a lesson
opens by default (the workstation). It uses its own namespace and
database, and removes every engine object it made, whatever happens. Figures, not assertions.
"""

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NAMESPACE = f"lcbench{os.getpid()}"
REDIS_PORT = 6393
os.environ.update(
    {
        "DJANGO_SETTINGS_MODULE": "tutorial.settings.test",
        "LAYERCAKE_SANDBOX_NAMESPACE": NAMESPACE,
        "LAYERCAKE_TEST_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
    }
)

import aiodocker  # noqa: E402
import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.core.management import call_command  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from sandbox import protocol, services  # noqa: E402
from sandbox.owners import SESSION_KEY  # noqa: E402

# What a lesson opens by default: the student's workstation, whose docker talks to the gateway.
IMAGE = settings.SANDBOX_IMAGE
PROMPT = b"$ "
FLOOD_BYTES = 100_000_000
FLOODS = {
    "yes (2-byte lines)": "yes | head -c 20000000",
    "200-byte lines": f"yes $(printf %0200d 0) | head -c {FLOOD_BYTES}",
}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def ms(value: float) -> str:
    return f"{value * 1000:7.1f} ms"


class Stack:
    """Redis, a Celery worker and uvicorn, as children of this process."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        self.port = 0

    def start(self) -> None:
        if not _answers(REDIS_PORT):
            self.children.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", ""],
                    stdout=subprocess.DEVNULL,
                )
            )
            _wait(lambda: _answers(REDIS_PORT))
        call_command("migrate", verbosity=0)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = dict(os.environ)
        python = str(Path(sys.executable).parent)
        self.children.append(
            subprocess.Popen(
                [f"{python}/celery", "-A", "tutorial", "worker", "--concurrency=2", "--loglevel=WARNING"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        # The workstation's docker socket: a launch waits for the gateway to serve it.
        self.children.append(
            subprocess.Popen(
                [f"{python}/python", "manage.py", "gateway"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.web = subprocess.Popen(
            [
                f"{python}/uvicorn",
                "tutorial.asgi:application",
                *("--port", str(self.port), "--ws", "websockets-sansio"),
                *("--ws-max-size", str(settings.TERMINAL_MAX_FRAME_BYTES + 1024)),
                *("--no-access-log", "--log-level", "warning"),
            ],
            cwd=ROOT,
            env=env,
        )
        self.children.append(self.web)
        _wait(lambda: _answers(self.port))
        time.sleep(2)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.web.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        for child in reversed(self.children):
            child.terminate()
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=15)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(ready: Callable[[], bool], *, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("a service of the bench did not start")
        time.sleep(0.05)


class Client:
    """A browser's side of the protocol."""

    def __init__(self, ws: ClientConnection, *, ack: bool = True) -> None:
        self.ws = ws
        self.ack = ack
        self.offset = 0
        self.state = ""
        self.tail = b""

    async def frame(self) -> bytes:
        frame = await self.ws.recv()
        assert isinstance(frame, bytes)
        kind, body = frame[0], frame[1:]
        if kind == protocol.STATUS:
            import json

            self.state = json.loads(body)["state"]
            return b""
        if kind not in (protocol.OUTPUT, protocol.REPLAY):
            return b""  # the sandbox's deadlines
        data = body[8:]
        self.offset = int.from_bytes(body[:8], "big") + len(data)
        self.tail = (self.tail + data)[-4096:]
        if self.ack:
            await self.ws.send(protocol.ack_frame(self.offset))
        return data

    async def until(self, marker: bytes) -> None:
        while marker not in self.tail:
            await self.frame()

    async def type(self, text: str) -> None:
        self.tail = b""
        await self.ws.send(protocol.input_frame(text.encode()))


def owner_cookie() -> tuple[str, str]:
    owner = f"anon-bench-{time.monotonic_ns()}"
    session = SessionStore()
    session[SESSION_KEY] = owner
    session.create()
    return owner, str(session.session_key)


@contextlib.asynccontextmanager
async def terminal(stack: Stack, *, ack: bool = True) -> AsyncIterator[tuple[Client, float]]:
    """A sandbox started as the Start button does, and its terminal once the prompt shows."""
    owner, cookie = await asyncio.to_thread(owner_cookie)
    started = time.perf_counter()
    sandbox = await asyncio.to_thread(services.sandbox_start, owner_key=owner, user=None, lesson=None)
    headers = {"Origin": f"http://127.0.0.1:{stack.port}", "Cookie": f"sessionid={cookie}"}
    url = f"ws://127.0.0.1:{stack.port}{sandbox.terminal_path}"
    try:
        async with connect(url, additional_headers=headers, max_size=2**24) as ws:
            client = Client(ws, ack=True)
            await ws.send(protocol.hello_frame(has_screen=False, offset=0))
            await ws.send(protocol.resize_frame(120, 40))
            await client.until(PROMPT)
            prompt_after = time.perf_counter() - started
            client.ack = ack
            yield client, prompt_after
    finally:
        await asyncio.to_thread(services.sandbox_stop, sandbox=sandbox, reason=services.EndReason.STOPPED)


async def bare_run(docker: aiodocker.Docker) -> float:
    """The floor of a cold start: create, attach and start a TTY container of the same image; time to prompt."""
    started = time.perf_counter()
    container = await docker.containers.create(
        {
            "Image": IMAGE,
            "Tty": True,
            "OpenStdin": True,
            "Labels": {"layercake.managed": "1", "layercake.namespace": NAMESPACE},
            "HostConfig": {"AutoRemove": False},
        }
    )
    try:
        stream = container.attach(stdin=True, stdout=True, stderr=True)
        async with stream:
            await container.start()
            seen = b""
            while PROMPT not in seen:
                message = await stream.read_out()
                if message is None:
                    raise RuntimeError("the bare container ended")
                seen += message.data
        return time.perf_counter() - started
    finally:
        await container.delete(force=True)


async def exec_shell(docker: aiodocker.Docker, container: str, command: list[str]) -> Any:
    exec_ = await docker.containers.container(container).exec(command, stdin=True, tty=True, user="1000")
    return exec_.start(detach=False)


async def echo_floor(docker: aiodocker.Docker, container: str, samples: int) -> list[float]:
    stream = await exec_shell(docker, container, ["bash", "--norc", "-i"])
    timings = []
    async with stream:
        await asyncio.sleep(0.5)
        for _ in range(samples):
            started = time.perf_counter()
            await stream.write_in(b"x")
            while True:
                message = await stream.read_out()
                if message is not None and b"x" in message.data:
                    break
            timings.append(time.perf_counter() - started)
            await stream.write_in(b"\x7f")
            await stream.read_out()
            await asyncio.sleep(0.005)
    return timings


async def echo_ours(client: Client, samples: int) -> list[float]:
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        await client.type("x")
        while b"x" not in client.tail:
            await client.frame()
        timings.append(time.perf_counter() - started)
        await client.type("\x7f")
        await client.frame()
        await asyncio.sleep(0.005)
    return timings


async def flood_ours(client: Client, command: str, size: int) -> float:
    start_offset = client.offset
    started = time.perf_counter()
    await client.type(f"{command}; echo FLOOD-$((1+1))\r")
    await client.until(b"FLOOD-2")
    elapsed = time.perf_counter() - started
    return (client.offset - start_offset) / elapsed / 1e6 if elapsed else 0.0


async def flood_floor(docker: aiodocker.Docker, container: str, command: str) -> float:
    stream = await exec_shell(docker, container, ["bash", "-c", command])
    received = 0
    started = time.perf_counter()
    async with stream:
        while (message := await stream.read_out()) is not None:
            received += len(message.data)
    return received / (time.perf_counter() - started) / 1e6


async def interrupt(client: Client) -> float:
    await client.type("yes\r")
    for _ in range(50):
        await client.frame()
    started = time.perf_counter()
    await client.ws.send(protocol.input_frame(b"\x03"))
    client.tail = b""
    await client.until(PROMPT)
    return time.perf_counter() - started


async def memory(stack: Stack, terminals: int, *, ack: bool) -> float:
    """RSS growth of the web server per terminal while every terminal floods."""
    baseline = stack.rss_kib()
    async with contextlib.AsyncExitStack() as stack_of_terminals:
        clients = [
            await stack_of_terminals.enter_async_context(terminal(stack, ack=ack)) for _ in range(terminals)
        ]
        for client, _ in clients:
            await client.type(f"{FLOODS['200-byte lines']}\r")
        peak = baseline
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for client, _ in clients:
                if ack:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client.frame(), 0.05)
                else:
                    # A slow browser: it reads now and then, and acknowledges nothing.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client.ws.recv(), 0.001)
            peak = max(peak, stack.rss_kib())
            await asyncio.sleep(0.05 if not ack else 0)
    return (peak - baseline) / terminals


async def main(runs: int, samples: int, terminals: int) -> None:
    stack = Stack()
    docker = aiodocker.Docker()
    try:
        await asyncio.to_thread(stack.start)
        print(f"Layercake terminal bench - image {IMAGE}, {os.cpu_count()} cores\n")

        ours, floor = [], []
        for _ in range(runs):
            floor.append(await bare_run(docker))
            async with terminal(stack) as (_, prompt_after):
                ours.append(prompt_after)
        f50, f95 = percentile(floor, 0.5), percentile(floor, 0.95)
        print(f"Click to prompt, cold ({runs} runs)")
        print(f"  bare docker run (create+attach+start) p50 {ms(f50)}  p95 {ms(f95)}")
        o50, o95 = percentile(ours, 0.5), percentile(ours, 0.95)
        print(f"  Layercake (service, Celery, websocket) p50 {ms(o50)}  p95 {ms(o95)}")
        print(f"  target: p50 <= 1.2 x floor + 150 ms = {ms(1.2 * f50 + 0.15)}\n")

        async with terminal(stack) as (client, _):
            container = f"{NAMESPACE}-sb-" + client.ws.request.path.split("/")[3] if client.ws.request else ""
            floor_echo = await echo_floor(docker, container, samples)
            our_echo = await echo_ours(client, samples)
            print(f"Keystroke echo ({samples} samples)")
            for name, values in (("docker exec pty", floor_echo), ("Layercake websocket", our_echo)):
                p50, p95, p99 = (percentile(values, q) for q in (0.5, 0.95, 0.99))
                print(f"  {name:22} p50 {ms(p50)}  p95 {ms(p95)}  p99 {ms(p99)}")
            print(f"  target: p99 <= 1.3 x floor + 2 ms = {ms(1.3 * percentile(floor_echo, 0.99) + 0.002)}\n")

            print("Output flood (MB/s)")
            for name, command in FLOODS.items():
                base = await flood_floor(docker, container, command)
                mine = await flood_ours(client, command, FLOOD_BYTES)
                print(f"  {name:20} docker exec -t {base:6.1f}   Layercake {mine:6.1f}")
            print("  target: >= 50 MB/s\n")

            stops = [await interrupt(client) for _ in range(5)]
            print("Ctrl-C during `yes` until the prompt is back (5 samples)")
            print(f"  p50 {ms(percentile(stops, 0.5))}  max {ms(max(stops))}  target < 200 ms\n")

        slow = await memory(stack, terminals, ack=False)
        fast = await memory(stack, terminals, ack=True)
        bound = (settings.TERMINAL_REPLAY_BYTES + settings.TERMINAL_WINDOW_BYTES) / 1024
        print(f"Web server memory per flooding terminal ({terminals} at once), peak RSS growth")
        print(f"  browser that never acknowledges {slow:8.0f} KiB")
        print(f"  browser that keeps up           {fast:8.0f} KiB")
        print(f"  design bound: replay buffer + window = {bound:.0f} KiB, plus the attach stream's own buffers")
    finally:
        await docker.close()
        stack.stop()
        _purge()


def _purge() -> None:
    import docker as docker_sdk

    client = docker_sdk.from_env()
    mine = {"label": f"layercake.namespace={NAMESPACE}"}
    for container in client.api.containers(all=True, filters=mine):
        with contextlib.suppress(docker_sdk.errors.APIError):
            client.api.remove_container(container["Id"], force=True)
    for network in client.api.networks(filters=mine):
        with contextlib.suppress(docker_sdk.errors.APIError):
            client.api.remove_network(network["Id"])
    for path in Path(settings.DATA_DIR).glob(f"{NAMESPACE}*"):
        path.unlink(missing_ok=True)
    shutil.rmtree(settings.GATEWAY_DIR, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="cold starts of each kind")
    parser.add_argument("--samples", type=int, default=200, help="keystrokes of each kind")
    parser.add_argument("--terminals", type=int, default=8, help="flooding terminals for the memory figure")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, arguments.samples, arguments.terminals))
