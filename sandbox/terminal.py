"""A sandbox's shell as this web process sees it: attached once, kept while browsers come and go.

The relay reads the shell's TTY for as long as the shell lives, so a command keeps running when the tab
closes. It keeps the last TERMINAL_REPLAY_BYTES of output with their offsets, so a browser that comes back
gets either exactly what it missed (it still has its screen) or a replay of what was kept (a new tab).
At most TERMINAL_WINDOW_BYTES are in flight to a browser; past that the relay stops reading, the TTY fills,
and the program writing to it waits, as it would on a slow real terminal. Memory per terminal is therefore
bounded by the replay buffer plus the window, whatever the browser's speed.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .backends import get_backend
from .backends.base import TerminalStream

log = logging.getLogger(__name__)

# Each resize the engine is told of is a call to the shared engine: a browser sends one per frame of a window
# being dragged, a script thousands a second, and each websocket that opens brings one. Whatever browser they
# come from, sizes that come faster than this are coalesced to the last.
RESIZE_INTERVAL = 0.25


class Viewer(Protocol):
    """A browser connected to the terminal."""

    async def send_output(self, *, offset: int, data: bytes) -> None: ...

    async def send_replay(self, *, offset: int, data: bytes) -> None: ...

    async def detached(self, *, reason: str) -> None: ...


class ReplayBuffer:
    """The last `limit` bytes of output, addressed by their offset in the whole output."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self._data = bytearray()
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + len(self._data)

    def append(self, data: bytes) -> None:
        self._data += data
        excess = len(self._data) - self.limit
        if excess > 0:
            del self._data[:excess]
            self.start += excess

    def since(self, offset: int) -> bytes | None:
        """The bytes from `offset` to the end, or None when `offset` is not in the buffer."""
        if not self.start <= offset <= self.end:
            return None
        return bytes(self._data[offset - self.start :])

    def everything(self) -> bytes:
        return bytes(self._data)

    def rebase(self, offset: int) -> None:
        """Number an empty buffer's output from `offset`: a new relay continuing a browser's screen."""
        if self._data or self.start:
            raise ValueError("only an empty buffer can be rebased")
        self.start = offset


class TerminalRelay:
    def __init__(
        self,
        *,
        sandbox_id: int,
        stream: TerminalStream,
        replay_bytes: int,
        window_bytes: int,
        on_gone: Callable[[], Awaitable[None]],
    ) -> None:
        self.sandbox_id = sandbox_id
        self._stream = stream
        self._buffer = ReplayBuffer(limit=replay_bytes)
        self._window = window_bytes
        self._on_gone = on_gone
        self._viewer: Viewer | None = None
        self._acked = 0
        self._can_send = asyncio.Event()
        self._can_send.set()
        self._task: asyncio.Task[None] | None = None
        self._size: tuple[int, int] | None = None
        self._applied_size: tuple[int, int] | None = None
        self._resizing: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"terminal-{self.sandbox_id}")

    async def _pump(self) -> None:
        try:
            while True:
                await self._can_send.wait()
                data = await self._stream.read()
                if data is None:
                    break
                offset = self._buffer.end
                self._buffer.append(data)
                viewer = self._viewer
                if viewer is not None:
                    self._update_window()
                    try:
                        await viewer.send_output(offset=offset, data=data)
                    except Exception:
                        log.info("terminal %s: a viewer went away mid-send", self.sandbox_id, exc_info=True)
                        self._drop(viewer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("terminal %s: the stream failed", self.sandbox_id, exc_info=True)
        await self._finish()

    async def _finish(self) -> None:
        self.closed = True
        _relays.pop(self.sandbox_id, None)
        with contextlib.suppress(Exception):
            await self._stream.close()
        # Record why the shell went before telling the browser, so that the browser is told the reason.
        try:
            await self._on_gone()
        except Exception:
            log.warning("terminal %s: could not record the shell's end", self.sandbox_id, exc_info=True)
        viewer, self._viewer = self._viewer, None
        if viewer is not None:
            with contextlib.suppress(Exception):
                await viewer.detached(reason="gone")

    def _update_window(self) -> None:
        if self._viewer is None or self._buffer.end - self._acked < self._window:
            self._can_send.set()
        else:
            self._can_send.clear()

    def _drop(self, viewer: Viewer) -> None:
        if self._viewer is viewer:
            self._viewer = None
            self._update_window()

    async def attach(self, viewer: Viewer, *, has_screen: bool, offset: int) -> None:
        """Make `viewer` the terminal's browser, bringing its screen up to date. A previous one is let go."""
        previous, self._viewer = self._viewer, viewer
        if previous is not None and previous is not viewer:
            with contextlib.suppress(Exception):
                await previous.detached(reason="elsewhere")
        if has_screen and self._buffer.start == 0 and self._buffer.end == 0:
            # This process has not seen the shell yet (the web server restarted): the browser's screen is
            # the best there is, so carry on from it.
            self._buffer.rebase(offset)
        missed = self._buffer.since(offset) if has_screen else None
        if missed is not None:
            self._acked = offset
            if missed:
                await viewer.send_output(offset=offset, data=missed)
        else:
            self._acked = self._buffer.start
            await viewer.send_replay(offset=self._buffer.start, data=self._buffer.everything())
        self._update_window()

    def detach(self, viewer: Viewer) -> None:
        self._drop(viewer)

    def ack(self, viewer: Viewer, *, offset: int) -> None:
        if viewer is self._viewer and self._acked < offset <= self._buffer.end:
            self._acked = offset
            self._update_window()

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    def resize(self, *, cols: int, rows: int, anew: bool = False) -> None:
        """Size the TTY: now if it was not resized within RESIZE_INTERVAL, else once that has passed, to the
        last size asked for by then.

        `anew` tells the engine even a size it was told last: another web process may have resized the TTY
        since (each has a relay of its own), and a browser that attaches brings the size it needs."""
        self._size = (cols, rows)
        if anew:
            self._applied_size = None
        if self._resizing is None or self._resizing.done():
            self._resizing = asyncio.create_task(self._resize(), name=f"terminal-{self.sandbox_id}-resize")

    async def _resize(self) -> None:
        while not self.closed and self._size is not None and self._size != self._applied_size:
            size = self._size
            try:
                await self._stream.resize(cols=size[0], rows=size[1])
            except Exception:
                log.warning("terminal %s: a resize failed", self.sandbox_id, exc_info=True)
                return
            self._applied_size = size
            await asyncio.sleep(RESIZE_INTERVAL)

    async def close(self) -> None:
        if self._resizing is not None:
            self._resizing.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _opening.pop(self.sandbox_id, None)
        if not self.closed:
            self.closed = True
            _relays.pop(self.sandbox_id, None)
            with contextlib.suppress(Exception):
                await self._stream.close()


_relays: dict[int, TerminalRelay] = {}
_opening: dict[int, asyncio.Lock] = {}


async def terminal_relay(
    *,
    sandbox_id: int,
    backend_state: dict[str, Any],
    replay_bytes: int,
    window_bytes: int,
    on_gone: Callable[[], Awaitable[None]],
) -> TerminalRelay:
    """This process's relay for the sandbox, attaching to its shell the first time."""
    lock = _opening.setdefault(sandbox_id, asyncio.Lock())
    async with lock:
        relay = _relays.get(sandbox_id)
        if relay is not None and not relay.closed:
            return relay
        stream = await get_backend().open_terminal(backend_state)
        relay = TerminalRelay(
            sandbox_id=sandbox_id,
            stream=stream,
            replay_bytes=replay_bytes,
            window_bytes=window_bytes,
            on_gone=on_gone,
        )
        _relays[sandbox_id] = relay
        relay.start()
    return relay


async def terminal_close(*, sandbox_id: int) -> None:
    relay = _relays.get(sandbox_id)
    if relay is not None:
        await relay.close()
