"""The student's shell against the directory that holds its gateway socket: the gateway makes the socket there
whenever it (re)serves the session, as whatever user it runs as, so nothing in the workstation may change it."""

import os
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def test_the_workstation_cannot_change_the_directory_of_its_socket_whoever_owns_it(sandbox_factory: Any) -> None:
    sandbox = sandbox_factory()
    directory = sandbox.socket.parent
    owner = directory.stat()
    # A gateway that runs as the socket's user (no root needed when that is its own user) owns the directory.
    os.chown(directory, settings.GATEWAY_SOCKET_UID, settings.GATEWAY_SOCKET_GID)
    try:
        for attempt in (
            "ln -s /etc/shadow /run/layercake/.docker.sock.new",
            "mv /run/layercake/docker.sock /run/layercake/moved",
            "rm -f /run/layercake/docker.sock",
            "touch /run/layercake/planted",
        ):
            code, output = sandbox.workstation.docker(attempt)
            assert code != 0, (attempt, output)
        assert sorted(p.name for p in Path(directory).iterdir()) == ["docker.sock"]
        code, output = sandbox.workstation.docker("docker ps -q")
        assert code == 0, output
    finally:
        os.chown(directory, owner.st_uid, owner.st_gid)
