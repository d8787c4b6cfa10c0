"""SIGKILL the gateway mid-session: it comes back, every socket with it, and nothing is left half-made."""

import json
import socket
import time
from typing import Any

import docker
import pytest

from .conftest import GatewayProcess, StudentSession, _wait_for_socket, owned_objects

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis, pytest.mark.slow]


def test_sigkill_mid_request_then_restart(
    gateway_process: GatewayProcess,
    student_factory: Any,
    workstation_factory: Any,
    curated_image: str,
    engine: docker.APIClient,
) -> None:
    first: StudentSession = student_factory()
    second: StudentSession = student_factory()
    ws = workstation_factory.for_session(first)
    code, output = ws.docker(f"docker run -d --name before {curated_image} sleep 300")
    assert code == 0, output

    body = json.dumps({"Image": curated_image, "Cmd": ["true"]}).encode()
    cut = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cut.connect(str(first.socket))
    cut.sendall(
        b"POST /v1.41/containers/create?name=halfway HTTP/1.1\r\nHost: docker\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body[: len(body) // 2])
    )
    time.sleep(0.2)
    gateway_process.kill()
    cut.close()
    assert first.socket.exists()

    gateway_process.start()
    _wait_for_socket(first.socket)
    _wait_for_socket(second.socket)
    code, output = ws.docker("docker ps --format '{{.Names}}'")
    assert code == 0 and output == "before\n", output
    names = [c["Names"] for c in owned_objects(engine, first)["containers"]]
    assert len(names) == 1
    assert second.call("GET", "/containers/json?all=1").json() == []


def test_closed_session_loses_its_socket_and_directory(student_factory: Any) -> None:
    from sandbox.gateway.client import gateway_session_close

    session: StudentSession = student_factory()
    gateway_session_close(session_id=session.session_id)
    assert not session.directory.exists()
    gateway_session_close(session_id=session.session_id)
