"""The sixth pass at what a student, or anyone else who reaches the site, could do through it: what the
earlier passes (test_site_security.py) did not try."""

import contextlib
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from lessons.models import Lesson
from lessons.services import lessons_load
from sandbox.tests.test_ports import WEB, _sandbox, _user, records

__all__ = ["records"]

LESSON_FILE = "---\nslug: filed\ntitle: Filed\n---\nAs the file has it.\n"


@pytest.mark.django_db
def test_a_staff_member_who_may_only_view_lessons_cannot_put_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lessons.services.CONTENT_DIR", tmp_path)
    (tmp_path / "filed.md").write_text(LESSON_FILE)
    lesson = lessons_load(directory=tmp_path).created[0]
    Lesson.objects.filter(pk=lesson.pk).update(body="An editor's work.\n")
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_lesson"))
    browser = Client()
    browser.force_login(viewer)
    changelist = reverse("admin:lessons_lesson_changelist")
    assert browser.get(changelist).status_code == 200
    assert "put_back" not in browser.get(changelist).content.decode()

    browser.post(changelist, {"action": "put_back", "_selected_action": [lesson.pk]})
    lesson.refresh_from_db()
    assert lesson.body == "An editor's work.\n"


# A web server that answers with a body that never ends, as fast as it is taken.
ENDLESS = "#!/bin/sh\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n'\nexec cat /dev/zero\n"


@pytest.fixture
def endless_web(engine_cleanup: None) -> Iterator[str]:
    """The address of an endless web server (port 8000) in a container on a network of this test's own."""
    labels = {"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE}
    engine = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=60)
    name = f"{settings.SANDBOX_NAMESPACE}-endless"
    network = engine.networks.create(name, driver="bridge", internal=True, labels=labels)
    try:
        serve = 'printf "%s" "$ENDLESS" > /tmp/endless && chmod +x /tmp/endless && exec socat {} EXEC:/tmp/endless'
        web = engine.containers.run(
            "layercake/workstation:latest",
            ["sh", "-c", serve.format("TCP-LISTEN:8000,fork,reuseaddr")],
            environment={"ENDLESS": ENDLESS},
            name=name,
            labels=labels,
            network=name,
            detach=True,
        )
        # Listening on port 8000 (1F40), in state LISTEN (0A).
        for _ in range(100):
            if web.exec_run(["grep", "-q", ":1F40 00000000:0000 0A", "/proc/net/tcp"]).exit_code == 0:
                break
            time.sleep(0.1)
        web.reload()
        yield web.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]
    finally:
        with contextlib.suppress(docker.errors.APIError):
            engine.containers.get(name).remove(force=True)
        with contextlib.suppress(docker.errors.APIError):
            network.remove()
        engine.close()


def _connections_to(address: str, port: int) -> int:
    """This machine's established TCP connections to address:port (the proxy's, from its host side)."""
    wanted = f"{socket.htonl(int(ipaddress.IPv4Address(address))):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[2] == wanted and row[3] == "01")


@pytest.mark.engine
@pytest.mark.redis
@pytest.mark.slow
def test_a_browser_that_reads_a_port_slowly_does_not_hold_the_exchange_past_its_deadline(
    live_asgi: str, endless_web: str, records: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the bytes between the chunks were timed: a script reading a byte now and then held the connection to
    # the port, and the response's buffers, for as long as it liked, each one uncounted once past its deadline.
    monkeypatch.setattr("sandbox.ports.PROXY_DEADLINE", 3.0)
    owner = _user("owner")
    sandbox = _sandbox(owner)
    records(sandbox, [{**WEB, "container_port": 8000, "address": endless_web}])
    browser = Client()
    browser.force_login(owner)
    host, port = live_asgi.split(":")
    path = reverse("sandbox:port", kwargs={"pk": sandbox.pk, "port": 8080})
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cookie = browser.cookies["sessionid"].value
        slow.sendall(f"GET {path} HTTP/1.1\r\nHost: {live_asgi}\r\nCookie: sessionid={cookie}\r\n\r\n".encode())
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(1)
        assert _connections_to(endless_web, 8000) == 1, "the exchange is open while the browser reads"
        time.sleep(4)
        assert _connections_to(endless_web, 8000) == 0
