import asyncio

import pytest

from sandbox import terminal
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
    assert buffer.since(6, at_most=2) == b"wo"


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
    """A browser that takes every frame at once."""

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


class StuckRecorder(Recorder):
    """A browser that stopped reading: a send to it waits until it is cancelled."""

    async def send_output(self, *, offset: int, data: bytes) -> None:
        await asyncio.Event().wait()

    async def send_replay(self, *, offset: int, data: bytes) -> None:
        await asyncio.Event().wait()

    async def detached(self, *, reason: str) -> None:
        self.detached_for = reason
        # Closing its websocket waits on its socket as well.
        await asyncio.Event().wait()


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _watched(viewer: Recorder, *, replay: int = 64, window: int = 16) -> tuple[MemoryStream, TerminalRelay]:
    """A relay of a new shell, with `viewer` attached from the start."""
    stream = MemoryStream()
    relay, _ = await _relay(stream, replay=replay, window=window)
    relay.attach(viewer, has_screen=True, offset=0)
    return stream, relay


async def _emit(stream: MemoryStream, data: bytes, *, times: int = 1) -> None:
    """The shell prints `data` `times` times, and the relay has done what it can with it."""
    for _ in range(times):
        stream.output.put_nowait(data)
    await _settle()


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
    relay.attach(viewer, has_screen=False, offset=0)
    await _settle()
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
    relay.attach(viewer, has_screen=False, offset=0)
    await _settle()
    assert viewer.frames == [("replay", 48, b"y" * 32)]
    await relay.close()


@pytest.mark.asyncio
async def test_a_browser_with_its_screen_gets_exactly_what_it_missed() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream)
    first = Recorder()
    relay.attach(first, has_screen=False, offset=0)
    await _settle()
    stream.output.put_nowait(b"abc")
    await _settle()
    relay.detach(first)
    stream.output.put_nowait(b"def")
    await _settle()
    again = Recorder()
    relay.attach(again, has_screen=True, offset=3)
    await _settle()
    assert again.frames == [("output", 3, b"def")]
    await relay.close()


@pytest.mark.asyncio
async def test_a_second_tab_takes_over_and_the_first_is_told() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream)
    first, second = Recorder(), Recorder()
    relay.attach(first, has_screen=False, offset=0)
    await _settle()
    relay.attach(second, has_screen=False, offset=0)
    await _settle()
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
    relay.attach(viewer, has_screen=False, offset=0)
    await _settle()
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


@pytest.mark.asyncio
async def test_a_new_tab_takes_over_at_once_from_one_that_stopped_reading() -> None:
    stream = MemoryStream()
    relay, _ = await _relay(stream, replay=64, window=32)
    stuck = StuckRecorder()
    relay.attach(stuck, has_screen=False, offset=0)
    await _emit(stream, b"a" * 8)
    fresh = Recorder()
    relay.attach(fresh, has_screen=False, offset=0)
    await _settle()
    assert stuck.detached_for == "elsewhere"
    assert fresh.frames == [("replay", 0, b"a" * 8)]
    await _emit(stream, b"b")
    assert fresh.frames[-1] == ("output", 8, b"b")
    await relay.close()


@pytest.mark.asyncio
async def test_a_browser_that_stopped_reading_is_let_go_and_the_shell_reads_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(terminal, "STALL_TIMEOUT", 0.2)
    stuck = StuckRecorder()
    stream, relay = await _watched(stuck)
    await _emit(stream, b"c" * 8, times=10)
    relay.ack(stuck, offset=16)
    await _settle()
    assert stream.reads == 2, "the window is full, and an ack of what was never sent does not open it"
    assert stuck.detached_for is None
    await asyncio.sleep(0.3)
    assert stuck.detached_for == "slow"
    await _settle()
    assert stream.reads == 10, "with no browser left, the relay reads on"
    again = Recorder()
    relay.attach(again, has_screen=True, offset=0)
    await _settle()
    assert [kind for kind, _, _ in again.frames] == ["replay"], "what it missed is no longer all kept"
    await relay.close()


@pytest.mark.asyncio
async def test_output_waiting_for_a_browser_goes_out_in_bounded_frames() -> None:
    frame = terminal.OUTPUT_FRAME_BYTES
    viewer = Recorder()
    stream, relay = await _watched(viewer, replay=4 * frame, window=4 * frame)
    await _emit(stream, b"d" * (frame + 1))
    assert [(offset, len(data)) for _, offset, data in viewer.frames] == [(0, frame), (frame, 1)]
    await relay.close()


@pytest.mark.asyncio
async def test_the_last_output_reaches_the_browser_before_it_hears_the_shell_went() -> None:
    viewer = Recorder()
    stream, relay = await _watched(viewer)
    stream.output.put_nowait(b"bye")
    stream.output.put_nowait(None)
    await _settle()
    assert viewer.frames == [("output", 0, b"bye")]
    assert viewer.detached_for == "gone"
    late = Recorder()
    relay.attach(late, has_screen=True, offset=3)
    await _settle()
    assert late.detached_for == "gone"


@pytest.mark.asyncio
async def test_a_browser_that_acknowledges_nothing_with_the_window_full_is_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(terminal, "STALL_TIMEOUT", 0.2)
    slow, frozen = Recorder(), Recorder()
    stream, relay = await _watched(slow)
    await _emit(stream, b"f" * 8, times=4)
    # One that renders, however slowly, keeps the terminal.
    for acked in (8, 16):
        await asyncio.sleep(0.15)
        relay.ack(slow, offset=acked)
    await _settle()
    assert slow.detached_for is None and stream.reads == 4
    relay.attach(frozen, has_screen=True, offset=32)
    await _emit(stream, b"g" * 8, times=4)
    assert frozen.received == 16 and stream.reads == 6
    await asyncio.sleep(0.3)
    assert frozen.detached_for == "slow"
    await _settle()
    assert stream.reads == 8, "with no browser left, the relay reads on"
    await relay.close()
