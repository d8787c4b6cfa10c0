"""The terminal websocket protocol. Every message is a binary frame whose first byte says what it is.

Browser to server:
    HELLO     0x01  u8 flags, u64 offset. First frame. Bit 0 of flags: the browser still has a screen that
                    shows every output byte before `offset` (a reconnect after a network loss); otherwise it
                    has nothing (a new tab) and the server replays what it kept.
    INPUT     0x02  bytes for the shell.
    RESIZE    0x03  u16 cols, u16 rows.
    ACK       0x04  u64 offset: output bytes the browser has written to its screen.

Server to browser:
    OUTPUT    0x81  u64 offset of the first byte, then the bytes.
    REPLAY    0x82  u64 offset of the first byte, then the bytes. The browser resets its screen first, and
                    drops the replies its terminal makes to queries found in these bytes.
    STATUS    0x83  UTF-8 JSON: {"state": ..., "reason": ..., "message": ...}.
    DEADLINES 0x84  UTF-8 JSON: {"deadlines": [{"reason": "idle" | "max_age", "remaining": seconds}, ...]}:
                    the ends of a ready sandbox near enough to warn of, soonest first, none when none is. Sent
                    after the status and whenever that changes; input puts off "idle". Seconds, not times, so
                    that a browser whose clock is off still counts down right.
    EVENT     0x85  UTF-8 JSON: {"type": ..., ...}: something the student did in the sandbox (a container
                    started, an image built, the published ports changed), as the gateway publishes it
                    (sandbox/gateway/events.py), for the page to follow.

Integers are big-endian. The browser acknowledges output as it renders it; the server keeps at most a
window of unacknowledged bytes in flight and stops reading from the sandbox past that.
"""

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

HELLO = 0x01
INPUT = 0x02
RESIZE = 0x03
ACK = 0x04
OUTPUT = 0x81
REPLAY = 0x82
STATUS = 0x83
DEADLINES = 0x84
EVENT = 0x85

FLAG_HAS_SCREEN = 0x01

MAX_COLS = 1000
MAX_ROWS = 500

# Close codes in the application range (4000-4999).
CLOSE_ENDED = 4000
CLOSE_PROTOCOL = 4400
CLOSE_ELSEWHERE = 4409
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# The browser made no progress for a while (see terminal.STALL_TIMEOUT): it reconnects to carry on from its screen.
CLOSE_SLOW = 4408
CLOSE_UNAVAILABLE = 4503

_HELLO = struct.Struct(">BQ")
_RESIZE = struct.Struct(">HH")
_OFFSET = struct.Struct(">Q")
# The browser reads offsets as JavaScript numbers, exact below 2**53; a larger one is no screen's, and a relay
# numbered from it would overflow the frames' 64 bits.
MAX_OFFSET = 2**53 - 1


class ProtocolError(ValueError):
    """A frame that does not follow the protocol."""


@dataclass(frozen=True)
class Hello:
    has_screen: bool
    offset: int


@dataclass(frozen=True)
class Input:
    data: bytes


@dataclass(frozen=True)
class Resize:
    cols: int
    rows: int


@dataclass(frozen=True)
class Ack:
    offset: int


ClientFrame = Hello | Input | Resize | Ack


def parse_client_frame(frame: bytes, *, max_bytes: int) -> ClientFrame:
    if not frame:
        raise ProtocolError("empty frame")
    if len(frame) > max_bytes + 1:
        raise ProtocolError("frame too large")
    kind, body = frame[0], frame[1:]
    if kind == INPUT:
        return Input(bytes(body))
    if kind == ACK:
        if len(body) != _OFFSET.size:
            raise ProtocolError("malformed ack")
        return Ack(_offset(_OFFSET.unpack(body)[0]))
    if kind == RESIZE:
        if len(body) != _RESIZE.size:
            raise ProtocolError("malformed resize")
        cols, rows = _RESIZE.unpack(body)
        return Resize(cols, rows)
    if kind == HELLO:
        if len(body) != _HELLO.size:
            raise ProtocolError("malformed hello")
        flags, offset = _HELLO.unpack(body)
        return Hello(bool(flags & FLAG_HAS_SCREEN), _offset(offset))
    raise ProtocolError(f"unknown frame type {kind:#x}")


def _offset(value: int) -> int:
    if value > MAX_OFFSET:
        raise ProtocolError("offset out of range")
    return value


def resize_is_sane(resize: Resize) -> bool:
    return 1 <= resize.cols <= MAX_COLS and 1 <= resize.rows <= MAX_ROWS


def output_frame(offset: int, data: bytes) -> bytes:
    return bytes([OUTPUT]) + _OFFSET.pack(offset) + data


def replay_frame(offset: int, data: bytes) -> bytes:
    return bytes([REPLAY]) + _OFFSET.pack(offset) + data


def status_frame(state: str, reason: str = "", message: str = "") -> bytes:
    payload = {"state": state, "reason": reason, "message": message}
    return bytes([STATUS]) + json.dumps(payload).encode()


def deadlines_frame(deadlines: Iterable[tuple[str, float]]) -> bytes:
    payload = {
        "deadlines": [{"reason": reason, "remaining": round(remaining, 1)} for reason, remaining in deadlines]
    }
    return bytes([DEADLINES]) + json.dumps(payload).encode()


def event_frame(event: dict[str, object]) -> bytes:
    return bytes([EVENT]) + json.dumps(event).encode()


def hello_frame(*, has_screen: bool, offset: int) -> bytes:
    return bytes([HELLO]) + _HELLO.pack(FLAG_HAS_SCREEN if has_screen else 0, offset)


def input_frame(data: bytes) -> bytes:
    return bytes([INPUT]) + data


def resize_frame(cols: int, rows: int) -> bytes:
    return bytes([RESIZE]) + _RESIZE.pack(cols, rows)


def ack_frame(offset: int) -> bytes:
    return bytes([ACK]) + _OFFSET.pack(offset)
