"""The gateway serves a session until its expiry and not after, even with no reaper or launcher running."""

import secrets
import socket
import time
from typing import Any

import pytest

from .conftest import GatewayProcess, StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _connects(session: StudentSession) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(session.socket))
        except OSError:
            return False
    return True


def test_session_socket_goes_at_expiry(student_factory: Any, curated_image: str) -> None:
    lasting: StudentSession = student_factory()
    expiring: StudentSession = student_factory(expires_in=4)
    assert expiring.call("GET", "/v1.41/containers/json").status == 200

    deadline = time.monotonic() + 10
    while _connects(expiring) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _connects(expiring)
    assert not expiring.socket.exists()
    assert lasting.call("GET", "/v1.41/containers/json").status == 200


def test_expired_record_is_never_served(gateway_process: GatewayProcess) -> None:
    from sandbox.gateway.client import gateway_session_close, gateway_session_open

    session_id = 2_000_000_000 + secrets.randbelow(100_000_000)
    try:
        directory = gateway_session_open(
            session_id=session_id,
            owner_key="owner-expired",
            expires_at=int(time.time()) - 1,
            memory_budget_mb=64,
            max_containers=1,
            disk_budget_mb=64,
        )
        assert not (directory / "docker.sock").exists()
    finally:
        gateway_session_close(session_id=session_id)
