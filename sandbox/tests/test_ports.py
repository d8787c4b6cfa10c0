"""The lesson page's view of published ports, from the record the gateway keeps in Redis. The proxy's path
to a real container is tested against the engine in tests/gateway/test_ports.py; here, what it refuses."""

import asyncio
import contextlib
import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import docker
import httpx
import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.urls import reverse
from django.utils import timezone

from sandbox.models import Sandbox, SandboxState
from sandbox.ports import PROXY_PER_SANDBOX, PublishedPort, _location, _parse

pytestmark = [pytest.mark.redis]


def _user(name: str) -> User:
    return User.objects.create_user(username=name, password="x")


def _sandbox(owner: User, state: SandboxState = SandboxState.READY) -> Sandbox:
    now = timezone.now()
    return Sandbox.objects.create(
        owner_key=f"user-{owner.pk}",
        user=owner,
        image="layercake/workstation:latest",
        state=state,
        last_activity_at=now,
        expires_at=now + timedelta(minutes=15),
    )


@pytest.fixture
def records() -> Iterator[Any]:
    """Write a session's published ports as the gateway writes them; removed afterwards."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys: list[str] = []

    def write(sandbox: Sandbox, ports: list[dict[str, Any]]) -> None:
        key = f"{settings.SANDBOX_NAMESPACE}:gateway:ports:{sandbox.pk}"
        keys.append(key)
        client.set(key, json.dumps({"ports": ports}), ex=300)

    yield write
    if keys:
        client.delete(*keys)
    client.close()


WEB = {"port": 8080, "container_port": 80, "proto": "tcp", "container": "web", "address": "172.30.0.3"}


@pytest.mark.django_db
def test_the_panel_lists_the_published_ports_for_the_owner_only(records: Any) -> None:
    owner, stranger = _user("owner"), _user("stranger")
    sandbox = _sandbox(owner)
    records(sandbox, [{**WEB, "port": 9090, "container": "<api>"}, WEB])
    client = Client()
    client.force_login(owner)
    response = client.get(reverse("sandbox:ports", kwargs={"pk": sandbox.pk}))
    assert response.status_code == 200
    html = response.content.decode()
    links = [f'href="/sandbox/{sandbox.pk}/port/8080/"', f'href="/sandbox/{sandbox.pk}/port/9090/"']
    assert html.index(links[0]) < html.index(links[1])
    assert "web:80" in html and "&lt;api&gt;:80" in html and "<api>" not in html
    assert f'hx-get="/sandbox/{sandbox.pk}/ports/"' in html
    assert 'hx-trigger="layercake:ports-changed from:body delay:200ms, every 15s"' in html

    other = Client()
    other.force_login(stranger)
    for someone_else in (other, Client()):
        assert someone_else.get(reverse("sandbox:ports", kwargs={"pk": sandbox.pk})).status_code == 404


@pytest.mark.django_db
def test_an_ended_sandbox_lists_nothing_and_stops_the_polling(records: Any) -> None:
    owner = _user("owner")
    sandbox = _sandbox(owner, SandboxState.ENDED)
    records(sandbox, [WEB])
    client = Client()
    client.force_login(owner)
    response = client.get(reverse("sandbox:ports", kwargs={"pk": sandbox.pk}))
    assert response.status_code == 286
    assert "/port/" not in response.content.decode() and "hx-trigger" not in response.content.decode()


def test_a_record_never_points_the_proxy_at_this_machine_or_outside() -> None:
    entries = [
        WEB,
        {**WEB, "port": 1, "address": "127.0.0.1"},
        {**WEB, "port": 2, "address": "0.0.0.0"},
        {**WEB, "port": 3, "address": "169.254.169.254"},
        {**WEB, "port": 4, "address": "93.184.216.34"},
        {**WEB, "port": 5, "address": "::1"},
        {**WEB, "port": 6, "address": "web"},
        {**WEB, "port": 0},
        {**WEB, "port": 70000},
        {**WEB, "port": "8081"},
        {**WEB, "port": True},
        {**WEB, "port": 8082, "container_port": 0},
        "junk",
    ]
    assert _parse(json.dumps({"ports": entries})) == [PublishedPort(8080, 80, "web", "172.30.0.3")]
    assert _parse(b"not json") == [] and _parse(json.dumps({"ports": "x"})) == [] and _parse(None) == []


def test_redirects_stay_within_the_proxy() -> None:
    port = PublishedPort(8080, 80, "web", "172.30.0.3")
    prefix = "/sandbox/7/port/8080"
    assert _location("/login?next=/", prefix=prefix, port=port) == "/sandbox/7/port/8080/login?next=/"
    assert _location("http://localhost:8080/a#b", prefix=prefix, port=port) == "/sandbox/7/port/8080/a#b"
    assert _location("http://172.30.0.3/", prefix=prefix, port=port) == "/sandbox/7/port/8080/"
    assert _location("next", prefix=prefix, port=port) == "next"
    assert _location("//elsewhere.example/", prefix=prefix, port=port) == "//elsewhere.example/"


class Listener:
    """A web server on this machine's loopback that counts who reached it."""

    def __init__(self) -> None:
        self.hits = 0
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.hits += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.django_db(transaction=True)
async def test_the_proxy_refuses_what_it_must_not_relay(records: Any) -> None:
    from asgiref.sync import sync_to_async

    owner = await sync_to_async(_user)("owner")
    sandbox = await sync_to_async(_sandbox)(owner)
    listener = Listener()
    try:
        # A record naming this machine (as a broken or tampered one might) is not followed.
        await sync_to_async(records)(sandbox, [{**WEB, "address": "127.0.0.1", "container_port": listener.port}])
        client = AsyncClient()
        await client.aforce_login(owner)
        url = reverse("sandbox:port", kwargs={"pk": sandbox.pk, "port": 8080})
        assert (await client.get(url)).status_code == 404
        assert (await client.get(url + "deeper/path?q=1")).status_code == 404
        assert listener.hits == 0
        await sync_to_async(urllib.request.urlopen)(f"http://127.0.0.1:{listener.port}/", timeout=5)
        assert listener.hits == 1  # the control: it was there to be reached
        # A sandbox that is not ready has no ports to open, whatever the record says.
        await sync_to_async(records)(sandbox, [WEB])
        sandbox.state = SandboxState.ENDED
        await sync_to_async(sandbox.save)()
        assert (await client.get(url)).status_code == 404
        assert (await client.post(url)).status_code == 405
    finally:
        listener.close()


# A web server that answers at once, then sends one byte a second for as long as the connection lasts.
DRIP = (
    "#!/bin/sh\n"
    "printf 'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n'\n"
    "while :; do printf x; sleep 1; done\n"
)


@pytest.fixture
def dripping_web(engine_cleanup: None) -> Iterator[str]:
    """The address of a dripping web server (port 8000) in a container on a network of this test's own."""
    labels = {"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE}
    engine = docker.APIClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=60)
    name = f"{settings.SANDBOX_NAMESPACE}-drip"
    network = engine.create_network(name, driver="bridge", internal=True, labels=labels)["Id"]
    try:
        container = engine.create_container(
            "layercake/workstation:latest",
            [
                "sh",
                "-c",
                'printf "%s" "$DRIP" > /tmp/drip && chmod +x /tmp/drip && exec socat '
                "TCP-LISTEN:8000,fork,reuseaddr EXEC:/tmp/drip",
            ],
            name=name,
            environment={"DRIP": DRIP},
            labels=labels,
            host_config=engine.create_host_config(network_mode=name, mem_limit="64m"),
        )["Id"]
        engine.start(container)
        yield engine.inspect_container(container)["NetworkSettings"]["Networks"][name]["IPAddress"]
    finally:
        with contextlib.suppress(docker.errors.APIError):
            engine.remove_container(name, force=True)
        with contextlib.suppress(docker.errors.APIError):
            engine.remove_network(network)
        engine.close()


@pytest.mark.engine
@pytest.mark.slow
def test_a_dripping_port_is_cut_at_a_deadline_and_cannot_hold_every_connection(
    live_asgi: str, dripping_web: str, records: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = _user("owner")
    sandbox = _sandbox(owner)
    records(sandbox, [{**WEB, "container_port": 8000, "address": dripping_web}])
    browser = Client()
    browser.force_login(owner)
    url = f"http://{live_asgi}" + reverse("sandbox:port", kwargs={"pk": sandbox.pk, "port": 8080})
    cookies = {"sessionid": browser.cookies["sessionid"].value}

    async def session() -> None:
        async with httpx.AsyncClient(cookies=cookies, timeout=30) as http:
            monkeypatch.setattr("sandbox.ports.PROXY_DEADLINE", 3.0)
            started = time.monotonic()
            cut = await asyncio.wait_for(http.get(url), 20)
            assert cut.status_code == 200 and cut.text.startswith("x")
            assert time.monotonic() - started < 10

            monkeypatch.setattr("sandbox.ports.PROXY_DEADLINE", 60.0)
            async with contextlib.AsyncExitStack() as held:
                streams = [
                    await held.enter_async_context(http.stream("GET", url)) for _ in range(PROXY_PER_SANDBOX)
                ]
                assert [s.status_code for s in streams] == [200] * PROXY_PER_SANDBOX
                async with http.stream("GET", url) as one_more:
                    assert one_more.status_code == 503 and one_more.headers["Retry-After"] == "5"
            # The browser let them go: the slots are free again.
            deadline = time.monotonic() + 10
            while True:
                async with http.stream("GET", url) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the proxy never let go of the closed exchanges"
                await asyncio.sleep(0.2)

    asyncio.run(session())
