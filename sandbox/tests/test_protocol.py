import json

import pytest

from sandbox import protocol


def test_client_frames_round_trip() -> None:
    assert protocol.parse_client_frame(
        protocol.hello_frame(has_screen=True, offset=7), max_bytes=64
    ) == protocol.Hello(True, 7)
    assert protocol.parse_client_frame(protocol.input_frame(b"ls\r"), max_bytes=64) == protocol.Input(b"ls\r")
    assert protocol.parse_client_frame(protocol.resize_frame(120, 40), max_bytes=64) == protocol.Resize(120, 40)
    assert protocol.parse_client_frame(protocol.ack_frame(2**40), max_bytes=64) == protocol.Ack(2**40)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x7f",
        b"\x01\x00",
        b"\x03\x00\x10",
        b"\x04" + b"\x00" * 9,
        b"\x81" + b"\x00" * 8,
        # Offsets past what the browser's numbers hold: a relay numbered from one would break its own frames.
        b"\x01\x01" + b"\xff" * 8,
        b"\x04" + b"\xff" * 8,
    ],
)
def test_malformed_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_client_frame(frame, max_bytes=64)


def test_oversized_input_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_client_frame(protocol.input_frame(b"x" * 65), max_bytes=64)


@pytest.mark.parametrize(
    ("cols", "rows", "sane"), [(80, 24, True), (0, 24, False), (80, 0, False), (65535, 65535, False)]
)
def test_absurd_sizes_are_not_sane(cols: int, rows: int, sane: bool) -> None:
    assert protocol.resize_is_sane(protocol.Resize(cols, rows)) is sane


def test_server_frames_carry_offsets_and_status() -> None:
    frame = protocol.output_frame(5, b"hi")
    assert frame[0] == protocol.OUTPUT and int.from_bytes(frame[1:9], "big") == 5 and frame[9:] == b"hi"
    status = protocol.status_frame("ended", "idle", "The sandbox was idle for too long.")
    assert status[0] == protocol.STATUS
    assert json.loads(status[1:])["reason"] == "idle"


def test_deadlines_carry_seconds_left_soonest_first() -> None:
    frame = protocol.deadlines_frame([("idle", 59.96), ("max_age", 240.0)])
    assert frame[0] == protocol.DEADLINES
    assert json.loads(frame[1:]) == {
        "deadlines": [{"reason": "idle", "remaining": 60.0}, {"reason": "max_age", "remaining": 240.0}]
    }
    assert json.loads(protocol.deadlines_frame([])[1:]) == {"deadlines": []}
