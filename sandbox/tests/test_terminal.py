import asyncio

import pytest

from sandbox.terminal import RESIZE_INTERVAL, ReplayBuffer, TerminalRelay


def test_replay_buffer_keeps_the_tail_with_offsets() -> None:
    buffer = ReplayBuffer(limit=8)
    buffer.append(b"hello ")
    buffer.append(b"world")
    assert (buffer.start, buffer.end) == (3, 11)
    assert buffer.everything() == b"lo world"
    assert buffer.since(6) == b"world"
    assert buffer.since(11) == b""
    assert buffer.since(2) is None
    assert buffer.since(12) is None


class MemoryStream:
    """An in-memory TTY: what the test feeds comes out as output; what the relay writes is recorded."""

    def __init__(self) -> None:
        self.output: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.written = bytearray()
        self.reads = 0
        self.size: tuple[int, int] | None = None

    async def read(self) -> bytes | None:
        data = await self.output.get()
        self.reads += 1
        return data

    async def write(self, data: bytes) -> None:
        self.written += data

    async def resize(self, *, cols: int, rows: int) -> None:
        self.size = (cols, rows)

    async def close(self) -> None:
        pass


class Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bytes]] = []
        self.detached_for: str | None = None

    async def send_output(self, *, offset: int, data: bytes) -> None:
        self.frames.append(("output", offset, data))

    async def send_replay(self, *, offset: int, data: bytes) -> None:
        self.frames.append(("replay", offset, data))

    async def detached(self, *, reason: str) -> None:
        self.detached_for = reason

    @property
    def received(self) -> int:
        return sum(len(data) for _, _, data in self.frames)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _relay(stream: MemoryStream, *, replay: int = 64, window: int = 16) -> tuple[TerminalRelay, list[str]]:
    gone: list[str] = []

    async def on_gone() -> None:
        gone.append("gone")

    relay = TerminalRelay(sandbox_id=1, stream=stream, replay_bytes=replay, window_bytes=window, on_gone=on_gone)
    relay.start()
    return relay, gone


@pytest.mark.asyncio
async def test_relay_stops_reading_when_the_browser_falls_behind_and_resumes_on_ack() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream, window=16)
    viewer = Recorder()
    await relay.attach(viewer, has_screen=False, offset=0)
    for _ in range(10):
        stream.output.put_nowait(b"x" * 8)
    await _settle()
    assert viewer.received == 16
    assert stream.reads == 2
    relay.ack(viewer, offset=16)
    await _settle()
    assert stream.reads == 4
    await relay.close()


@pytest.mark.asyncio
async def test_relay_keeps_reading_with_no_browser_so_programs_keep_running() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream, replay=32, window=16)
    for _ in range(10):
        stream.output.put_nowait(b"y" * 8)
    await _settle()
    assert stream.reads == 10
    viewer = Recorder()
    await relay.attach(viewer, has_screen=False, offset=0)
    assert viewer.frames == [("replay", 48, b"y" * 32)]
    await relay.close()


@pytest.mark.asyncio
async def test_a_browser_with_its_screen_gets_exactly_what_it_missed() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream)
    first = Recorder()
    await relay.attach(first, has_screen=False, offset=0)
    stream.output.put_nowait(b"abc")
    await _settle()
    relay.detach(first)
    stream.output.put_nowait(b"def")
    await _settle()
    again = Recorder()
    await relay.attach(again, has_screen=True, offset=3)
    assert again.frames == [("output", 3, b"def")]
    await relay.close()


@pytest.mark.asyncio
async def test_a_second_tab_takes_over_and_the_first_is_told() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream)
    first, second = Recorder(), Recorder()
    await relay.attach(first, has_screen=False, offset=0)
    await relay.attach(second, has_screen=False, offset=0)
    assert first.detached_for == "elsewhere"
    stream.output.put_nowait(b"z")
    await _settle()
    assert second.received == 1 and first.received == 0
    await relay.close()


@pytest.mark.asyncio
async def test_the_end_of_the_shell_is_reported_once() -> None:
    stream = MemoryStream()
    relay, gone = await _relay(stream)
    viewer = Recorder()
    await relay.attach(viewer, has_screen=False, offset=0)
    stream.output.put_nowait(None)
    await _settle()
    assert gone == ["gone"]
    assert viewer.detached_for == "gone"
    assert relay.closed


@pytest.mark.asyncio
async def test_sizes_from_every_browser_are_coalesced_by_the_relay() -> None:
    stream = MemoryStream()
    applied: list[tuple[int, int]] = []

    async def resize(*, cols: int, rows: int) -> None:
        applied.append((cols, rows))

    stream.resize = resize  # type: ignore[method-assign]
    relay, _ = await _relay(stream)
    relay.resize(cols=80, rows=24, anew=True)
    await _settle()
    for cols in range(81, 120):
        relay.resize(cols=cols, rows=24, anew=True)
    await _settle()
    assert applied == [(80, 24)]
    await asyncio.sleep(RESIZE_INTERVAL * 1.5)
    assert applied == [(80, 24), (119, 24)]
    relay.resize(cols=119, rows=24)
    await asyncio.sleep(RESIZE_INTERVAL * 1.5)
    assert applied == [(80, 24), (119, 24)]
    await relay.close()
