"""The terminal websocket: authenticates the browser, then relays between it and the sandbox's shell."""

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from . import protocol, services, terminal
from .backends.base import SandboxError
from .models import Sandbox, SandboxState
from .owners import owner_key_for_scope
from .selectors import DeadlineNotice, sandbox_deadline_notice, sandbox_events
from .terminal import TerminalRelay, terminal_close, terminal_relay

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
EVENTS_RETRY_SECONDS = 15.0
ENDED_STATES = {SandboxState.ENDED, SandboxState.FAILED, SandboxState.STOPPING}
# Why the relay let a browser go, as the browser is told it.
LET_GO = {"elsewhere": protocol.CLOSE_ELSEWHERE, "slow": protocol.CLOSE_SLOW}


@database_sync_to_async
def _owned_sandbox(sandbox_id: int, owner_key: str | None) -> Sandbox | None:
    if owner_key is None:
        return None
    return Sandbox.objects.filter(pk=sandbox_id, owner_key=owner_key).select_related("lesson").first()


@database_sync_to_async
def _refresh(sandbox: Sandbox) -> Sandbox:
    sandbox.refresh_from_db()
    return sandbox


_touch = database_sync_to_async(services.sandbox_touch)
_shell_gone = database_sync_to_async(services.sandbox_shell_gone)
_message = database_sync_to_async(services.sandbox_message)


class TerminalConsumer(AsyncWebsocketConsumer):
    sandbox: Sandbox | None
    relay: TerminalRelay | None
    hello: protocol.Hello | None

    async def connect(self) -> None:
        self.sandbox = None
        self.relay = None
        self.hello = None
        # Set once this websocket is closing: it takes no part in the terminal any more, even while a browser
        # that does not read keeps its socket open.
        self.closing_code: int | None = None
        self.size: protocol.Resize | None = None
        self.last_touch = 0.0
        self.max_frame = settings.TERMINAL_MAX_FRAME_BYTES
        self.hello_timer: asyncio.TimerHandle | None = None
        self.closing: asyncio.Task[None] | None = None
        # What the browser was last told of the sandbox's deadlines, and the timer for when that next changes.
        self.notice: DeadlineNotice | None = None
        self.notice_timer: asyncio.TimerHandle | None = None
        self.notice_check: asyncio.Task[None] | None = None
        self.following: asyncio.Task[None] | None = None
        sandbox_id = int(self.scope["url_route"]["kwargs"]["pk"])
        sandbox = await _owned_sandbox(sandbox_id, owner_key_for_scope(self.scope))
        await self.accept()
        if sandbox is None:
            # Someone else's sandbox and one that does not exist look the same.
            await self._close(protocol.CLOSE_FORBIDDEN)
            return
        self.sandbox = sandbox
        self.group = services.sandbox_group(sandbox.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_overdue)

    def _hello_overdue(self) -> None:
        if self.hello is None:
            self._close_soon(protocol.CLOSE_PROTOCOL)

    def _close_soon(self, code: int) -> None:
        """Close without waiting for it, from where waiting on the browser's socket would hold others up."""
        if self.closing_code is None:
            self.closing = asyncio.ensure_future(self._close(code))

    async def _close(self, code: int) -> None:
        """Leave the terminal, then close the websocket. The close frame goes out after what the socket still
        holds, so this returns only once a browser that does not read has read it, or is gone."""
        if self.closing_code is not None:
            return
        self.closing_code = code
        self._cancel_timers()
        if self.relay is not None:
            self.relay.detach(self)
            self.relay = None
        try:
            await self.close(code=code)
        except Exception:
            log.info("terminal: a websocket went away before it could be closed", exc_info=True)

    async def _send(self, frame: bytes) -> bool:
        """Send a frame of the consumer's own; a browser whose socket takes none for STALL_TIMEOUT is let go."""
        try:
            async with asyncio.timeout(terminal.STALL_TIMEOUT):
                await self.send(bytes_data=frame)
        except TimeoutError:
            log.info("terminal: a browser took no frame for %s s; letting it go", terminal.STALL_TIMEOUT)
            self._close_soon(protocol.CLOSE_SLOW)
            return False
        return True

    def _cancel_timers(self) -> None:
        for timer in (self.hello_timer, self.notice_timer):
            if timer is not None:
                timer.cancel()
        # The look at the deadlines may be what is closing this websocket: it is not cut short then.
        for task in (self.notice_check, self.following):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def disconnect(self, code: int) -> None:
        if self.closing_code is None:
            self.closing_code = code
        self._cancel_timers()
        if self.sandbox is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        if self.relay is not None:
            self.relay.detach(self)
            self.relay = None

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.sandbox is None or self.closing_code is not None:
            return
        if bytes_data is None:
            await self._close(protocol.CLOSE_PROTOCOL)
            return
        try:
            frame = protocol.parse_client_frame(bytes_data, max_bytes=self.max_frame)
        except protocol.ProtocolError as exc:
            log.info("terminal %s: closing on a bad frame: %s", self.sandbox.pk, exc)
            await self._close(protocol.CLOSE_PROTOCOL)
            return
        if isinstance(frame, protocol.Hello):
            if self.hello is None:
                self.hello = frame
                await self._send_state(await _refresh(self.sandbox))
            return
        if self.hello is None:
            await self._close(protocol.CLOSE_PROTOCOL)
            return
        if isinstance(frame, protocol.Input):
            if self.relay is not None and frame.data:
                await self.relay.write(frame.data)
                await self._note_activity()
        elif isinstance(frame, protocol.Resize):
            if protocol.resize_is_sane(frame):
                self.size = frame
                if self.relay is not None:
                    self.relay.resize(cols=frame.cols, rows=frame.rows)
        elif isinstance(frame, protocol.Ack) and self.relay is not None:
            self.relay.ack(self, offset=frame.offset)

    async def _note_activity(self) -> None:
        now = time.monotonic()
        # Input while the idle timeout is being warned of puts it off at once, whenever the last write was.
        warned = self.notice is not None and self.notice.input_puts_off
        if warned or now - self.last_touch >= settings.TERMINAL_ACTIVITY_WRITE_INTERVAL:
            self.last_touch = now
            assert self.sandbox is not None
            if await _touch(sandbox_id=self.sandbox.pk):
                # Each terminal of the sandbox (this one too) tells its browser the deadlines afresh.
                await self.channel_layer.group_send(self.group, {"type": "sandbox.deadlines"})

    async def _send_state(self, sandbox: Sandbox) -> None:
        message = await _message(sandbox=sandbox)
        told = self.closing_code is None and await self._send(
            protocol.status_frame(sandbox.state, sandbox.end_reason, message)
        )
        if sandbox.state in ENDED_STATES:
            await terminal_close(sandbox_id=sandbox.pk)
            await self._close(protocol.CLOSE_ENDED)
        elif told and sandbox.state == SandboxState.READY:
            await self._send_deadlines(sandbox)
            if self.following is None:
                self.following = asyncio.ensure_future(self._follow_events(sandbox.pk))
            if self.relay is None:
                await self._attach(sandbox)

    async def _follow_events(self, sandbox_id: int) -> None:
        """Pass on what the student does in the sandbox, as the gateway publishes it, for the page to follow
        (its list of published ports, for one, is fetched again when they change). While Redis fails, the page
        still polls for what it shows, and this tries again now and then."""
        while self.closing_code is None:
            try:
                async with contextlib.aclosing(sandbox_events(sandbox_id=sandbox_id)) as events:
                    async for event in events:
                        if self.closing_code is not None or not await self._send(protocol.event_frame(event)):
                            return
            except (redis.RedisError, OSError):
                log.warning("terminal %s: cannot follow the sandbox's events", sandbox_id, exc_info=True)
            await asyncio.sleep(EVENTS_RETRY_SECONDS)

    async def _send_deadlines(self, sandbox: Sandbox) -> None:
        """Tell the browser which of the sandbox's ends are near, and look again when that would change."""
        if self.notice_timer is not None:
            self.notice_timer.cancel()
            self.notice_timer = None
        self.notice = sandbox_deadline_notice(sandbox=sandbox, now=timezone.now())
        if self.notice.changes_in is not None:
            self.notice_timer = asyncio.get_running_loop().call_later(self.notice.changes_in, self._deadlines_due)
        await self._send(protocol.deadlines_frame(self.notice.near))

    def _deadlines_due(self) -> None:
        self.notice_check = asyncio.ensure_future(self.sandbox_deadlines({}))

    async def _attach(self, sandbox: Sandbox) -> None:
        assert self.hello is not None
        sandbox_id = sandbox.pk

        async def on_gone() -> None:
            await _shell_gone(sandbox_id=sandbox_id)

        try:
            relay = await terminal_relay(
                sandbox_id=sandbox_id,
                backend_state=sandbox.backend_state,
                replay_bytes=settings.TERMINAL_REPLAY_BYTES,
                window_bytes=settings.TERMINAL_WINDOW_BYTES,
                on_gone=on_gone,
            )
        except SandboxError:
            log.warning("terminal %s: cannot attach", sandbox_id, exc_info=True)
            await _shell_gone(sandbox_id=sandbox_id)
            await self._without_a_shell()
            return
        if self.closing_code is not None:
            return
        self.relay = relay
        if self.size is not None:
            relay.resize(cols=self.size.cols, rows=self.size.rows, anew=True)
        relay.attach(self, has_screen=self.hello.has_screen, offset=self.hello.offset)

    # The relay's side.
    async def send_output(self, *, offset: int, data: bytes) -> None:
        await self.send(bytes_data=protocol.output_frame(offset, data))

    async def send_replay(self, *, offset: int, data: bytes) -> None:
        await self.send(bytes_data=protocol.replay_frame(offset, data))

    async def detached(self, *, reason: str) -> None:
        self.relay = None
        if reason in LET_GO:
            await self._close(LET_GO[reason])
            return
        await self._without_a_shell()

    async def _without_a_shell(self) -> None:
        """The stream to the shell broke, or could not be opened. If the sandbox ended (the reaper may end it
        while a browser attaches), say why; if it lives on, the browser reconnects and gets a fresh stream."""
        assert self.sandbox is not None
        sandbox = await _refresh(self.sandbox)
        if sandbox.state in ENDED_STATES:
            await self._send_state(sandbox)
        else:
            await self._close(protocol.CLOSE_UNAVAILABLE)

    # The channel layer's side.
    async def sandbox_status(self, event: dict[str, Any]) -> None:
        if self.sandbox is None or self.hello is None or self.closing_code is not None:
            return
        self.sandbox = await _refresh(self.sandbox)
        await self._send_state(self.sandbox)

    async def sandbox_deadlines(self, event: dict[str, Any]) -> None:
        """The sandbox was used (in this tab or another), or a deadline's warning is due."""
        if self.sandbox is None or self.hello is None or self.closing_code is not None:
            return
        self.sandbox = await _refresh(self.sandbox)
        if self.sandbox.state == SandboxState.READY and self.closing_code is None:
            await self._send_deadlines(self.sandbox)
