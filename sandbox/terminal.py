"""A sandbox's shell as this web process sees it: attached once, kept while browsers come and go.

The relay reads the shell's TTY for as long as the shell lives, so a command keeps running when the tab
closes. It keeps the last TERMINAL_REPLAY_BYTES of output with their offsets, so a browser that comes back
gets either exactly what it missed (it still has its screen) or a replay of what was kept (a new tab).
At most TERMINAL_WINDOW_BYTES are in flight to a browser; past that the relay stops reading, the TTY fills,
and the program writing to it waits, as it would on a slow real terminal.

Output reaches the browser from the replay buffer itself, by a task of its own that sends what the browser
has not been sent yet, so neither the shell nor a browser taking over ever waits on a browser's socket. A
browser that makes no progress for STALL_TIMEOUT while output waits for it (a frozen tab, a suspended
laptop, a network gone without a word) is let go, and the relay reads on as if no browser were there; a
browser that opens the terminal takes it over at once, whatever the one before it does. Memory per terminal
is therefore bounded by the replay buffer plus one frame, whatever the browsers do.
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
# A browser that makes no progress for this long while output waits for it is given up on: its socket takes
# no frame, or it acknowledges nothing while the window is full. The browser that comes back gets what it
# missed; a tab in the background, whose timers the browser slows, still renders within this.
STALL_TIMEOUT = 15.0
# Output waiting for a browser goes out in frames of at most this size, as the engine delivers it.
OUTPUT_FRAME_BYTES = 64 * 1024


class Viewer(Protocol):
    """A browser connected to the terminal.

    `detached` says the relay let the browser go: "elsewhere" (another browser took the terminal over), "slow"
    (it made no progress for STALL_TIMEOUT) or "gone" (the stream to the shell ended). The relay does not wait
    for it to return."""

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

    def since(self, offset: int, *, at_most: int | None = None) -> bytes | None:
        """The bytes from `offset` to the end (or the first `at_most` of them), or None when `offset` is not in
        the buffer."""
        if not self.holds(offset):
            return None
        first = offset - self.start
        return bytes(self._data[first : None if at_most is None else first + at_most])

    def holds(self, offset: int) -> bool:
        return self.start <= offset <= self.end

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
        self._delivery: asyncio.Task[None] | None = None
        self._sent = 0
        self._acked = 0
        # Set by new output and by acks: what the delivery to the browser waits for.
        self._changed = asyncio.Event()
        self._can_read = asyncio.Event()
        self._can_read.set()
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
                await self._can_read.wait()
                data = await self._stream.read()
                if data is None:
                    break
                self._buffer.append(data)
                self._changed.set()
                self._update_window()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("terminal %s: the stream failed", self.sandbox_id, exc_info=True)
        await self._finish()

    async def _deliver(self, viewer: Viewer, *, offset: int | None) -> None:
        """Send `viewer` the output from `offset` on, as it comes, or with no offset a replay of the buffer first.
        Ends once the relay has closed and all is sent."""
        try:
            sent = await self._replay(viewer) if offset is None else offset
            while True:
                data = self._buffer.since(sent, at_most=OUTPUT_FRAME_BYTES)
                if data is None:
                    # Only a window larger than the buffer lets a browser fall this far behind.
                    sent = await self._replay(viewer)
                elif data:
                    async with asyncio.timeout(STALL_TIMEOUT):
                        await viewer.send_output(offset=sent, data=data)
                    sent = self._sent = sent + len(data)
                elif self.closed:
                    return
                else:
                    self._changed.clear()
                    # With the window full, only an ack brings more.
                    async with asyncio.timeout(STALL_TIMEOUT if not self._can_read.is_set() else None):
                        await self._changed.wait()
        except TimeoutError:
            log.info(
                "terminal %s: a browser made no progress for %s s; letting it go", self.sandbox_id, STALL_TIMEOUT
            )
            self._drop(viewer)
            _let_go(viewer, reason="slow")
        except OSError:
            # The browser's socket closed under the send (uvicorn's ClientDisconnected): the usual way to go.
            log.info("terminal %s: a viewer went away mid-send", self.sandbox_id)
            self._drop(viewer)
        except Exception:
            log.warning("terminal %s: sending to a viewer failed", self.sandbox_id, exc_info=True)
            self._drop(viewer)

    async def _replay(self, viewer: Viewer) -> int:
        offset, data = self._buffer.start, self._buffer.everything()
        async with asyncio.timeout(STALL_TIMEOUT):
            await viewer.send_replay(offset=offset, data=data)
        self._sent = offset + len(data)
        return self._sent

    async def _finish(self) -> None:
        self.closed = True
        _relays.pop(self.sandbox_id, None)
        with contextlib.suppress(Exception):
            await self._stream.close()
        # The browser gets the shell's last output before anything says that the shell went.
        if self._delivery is not None:
            self._changed.set()
            await asyncio.wait([self._delivery])
        # Record why the shell went before telling the browser, so that the browser is told the reason.
        try:
            await self._on_gone()
        except Exception:
            log.warning("terminal %s: could not record the shell's end", self.sandbox_id, exc_info=True)
        viewer, self._viewer = self._viewer, None
        if viewer is not None:
            _let_go(viewer, reason="gone")

    def _update_window(self) -> None:
        if self._viewer is None or self._buffer.end - self._acked < self._window:
            self._can_read.set()
        else:
            self._can_read.clear()

    def _stop_delivery(self) -> None:
        delivery, self._delivery = self._delivery, None
        if delivery is not None and delivery is not asyncio.current_task():
            delivery.cancel()

    def _drop(self, viewer: Viewer) -> None:
        if self._viewer is viewer:
            self._viewer = None
            self._stop_delivery()
            self._update_window()

    def attach(self, viewer: Viewer, *, has_screen: bool, offset: int) -> None:
        """Make `viewer` the terminal's browser, bringing its screen up to date. A previous one is let go.

        Neither waits on a browser: a new tab takes over at once from one that stopped reading."""
        if self.closed:
            _let_go(viewer, reason="gone")
            return
        previous, self._viewer = self._viewer, viewer
        self._stop_delivery()
        if previous is not None and previous is not viewer:
            _let_go(previous, reason="elsewhere")
        if has_screen and self._buffer.start == 0 and self._buffer.end == 0:
            # This process has not seen the shell yet (the web server restarted): the browser's screen is
            # the best there is, so carry on from it.
            self._buffer.rebase(offset)
        resume = has_screen and self._buffer.holds(offset)
        self._acked = self._sent = offset if resume else self._buffer.start
        self._delivery = asyncio.create_task(
            self._deliver(viewer, offset=offset if resume else None), name=f"terminal-{self.sandbox_id}-output"
        )
        self._update_window()

    def detach(self, viewer: Viewer) -> None:
        self._drop(viewer)

    def ack(self, viewer: Viewer, *, offset: int) -> None:
        if viewer is self._viewer and self._acked < offset <= self._sent:
            self._acked = offset
            self._update_window()
            self._changed.set()

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
        self._stop_delivery()
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
# Viewers being told they were let go; held here so that the tasks live until they end.
_letting_go: set[asyncio.Task[None]] = set()


def _let_go(viewer: Viewer, *, reason: str) -> None:
    """Tell `viewer` it was let go, without waiting: closing a socket that does not drain waits as long as it."""
    task = asyncio.create_task(_tell_detached(viewer, reason=reason))
    _letting_go.add(task)
    task.add_done_callback(_letting_go.discard)


async def _tell_detached(viewer: Viewer, *, reason: str) -> None:
    try:
        await viewer.detached(reason=reason)
    except Exception:
        log.info("a viewer could not be told it was let go (%s)", reason, exc_info=True)


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
