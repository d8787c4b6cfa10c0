"""Published ports: `docker run -p` reaches the container from the student's shell and, through the lesson
page's proxy, from the owner's browser; nothing ever listens on the host."""

import base64
import json
import random
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import docker
import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import AsyncClient
from django.urls import reverse
from django.utils import timezone

from sandbox.models import Sandbox, SandboxState

from .conftest import GatewayProcess, LiveSandbox, TokenServer, _wait_for_socket

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

PAGE = "hello-from-{name}"
CGI = """#!/bin/sh
case "$PATH_INFO" in
  /go) printf 'Status: 302 Found\\r\\nLocation: /index.html\\r\\n\\r\\n'; exit 0 ;;
esac
printf 'Content-Type: text/plain\\r\\nSet-Cookie: sessionid=planted; Path=/\\r\\n\\r\\n'
echo "cookie=[$HTTP_COOKIE] host=[$HTTP_HOST] prefix=[$HTTP_X_FORWARDED_PREFIX]"
i=0; while [ $i -lt 200 ]; do echo "line $i of a long answer with no length"; i=$((i+1)); done
"""


def _listening_on_host(port: int) -> bool:
    """Whether anything in this machine's network namespace listens on the TCP port, on any address."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _host_connects(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_host_port() -> int:
    """8080 as in the lessons, unless something on this machine already has it."""
    for port in [8080, *random.sample(range(20000, 30000), 20)]:
        if not _listening_on_host(port) and not _host_connects(port):
            return port
    raise RuntimeError("no free port on this machine to publish")


def run_web(sandbox: LiveSandbox, name: str, port: int) -> tuple[int, str]:
    page = PAGE.format(name=name)
    command = f"mkdir -p /www/cgi-bin && echo {page} > /www/index.html && exec httpd -f -p 80 -h /www"
    return sandbox.workstation.docker(f"docker run -d --name {name} -p {port}:80 busybox sh -c '{command}'")


def curl_in_workstation(sandbox: LiveSandbox, port: int, path: str = "/", *, tries: int = 50) -> tuple[int, str]:
    """curl localhost:<port> in the student's shell, retrying while the server in the container starts."""
    script = (
        f"for i in $(seq {tries}); do out=$(curl -sS --max-time 2 localhost:{port}{path} 2>&1) && "
        '{ echo "$out"; exit 0; }; sleep 0.1; done; echo "$out"; exit 7'
    )
    return sandbox.workstation.docker(script)


def published_record(sandbox: LiveSandbox) -> list[tuple[int, int, str, str]]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        raw = client.get(f"{settings.SANDBOX_NAMESPACE}:gateway:ports:{sandbox.session_id}")
    finally:
        client.close()
    entries = json.loads(cast(bytes | None, raw) or b'{"ports": []}')["ports"]
    return [(e["port"], e["container_port"], e["container"], e["address"]) for e in entries]


def forwarders(engine: docker.APIClient, sandbox: LiveSandbox, *, all_states: bool = False) -> list[Any]:
    filters = {"label": [f"layercake.session={sandbox.session_id}", "layercake.role=port-forwarder"]}
    return list(engine.containers(all=all_states, filters=filters))


def test_a_published_port_answers_in_the_workstation_and_nowhere_on_the_host(
    sandbox_factory: Any, engine: docker.APIClient
) -> None:
    sandbox: LiveSandbox = sandbox_factory()
    since = int(time.time())
    port = free_host_port()
    code, output = run_web(sandbox, "web", port)
    assert code == 0, output
    # Asked at once, as the engine keeps only its most recent events and every exec in the workstation adds
    # some; until the next whole second, which the engine waits for, since the run may be in this one.
    events = sandbox.workstation.docker(
        f"docker events --since {since} --until $(($(date +%s) + 1)) --filter type=container "
        "--format '{{.Actor.ID}}'"
    )
    web_id = engine.inspect_container(sandbox.engine_name("web"))["Id"]
    assert events[0] == 0 and set(events[1].split()) == {web_id}, events
    code, output = curl_in_workstation(sandbox, port)
    assert code == 0 and output.strip() == "hello-from-web", output
    ps = sandbox.workstation.docker("docker ps --format '{{.Names}} {{.Ports}} {{.Networks}}'")
    assert ps == (0, f"web 0.0.0.0:{port}->80/tcp, :::{port}->80/tcp bridge\n")
    assert sandbox.workstation.docker("docker port web") == (
        0,
        f"80/tcp -> 0.0.0.0:{port}\n80/tcp -> [::]:{port}\n",
    )
    # As on the student's own machine, the container's address is where `docker inspect` shows it on the
    # default network, and the shell reaches it there.
    shown = sandbox.workstation.docker(
        "docker inspect -f '{{.HostConfig.NetworkMode}} {{.NetworkSettings.IPAddress}} "
        "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' web"
    )
    assert shown == (0, f"bridge {sandbox.address_of(sandbox.engine_name('web'))} bridge\n"), shown
    code, output = sandbox.workstation.docker(
        "curl -sS --max-time 5 $(docker inspect -f '{{.NetworkSettings.IPAddress}}' web):80/"
    )
    assert code == 0 and output.strip() == "hello-from-web", output
    networks = sandbox.workstation.docker("docker network ls --format '{{.Name}} {{.Driver}}'")
    assert networks == (0, "bridge bridge\n"), networks
    code, output = sandbox.workstation.docker(
        "docker network inspect -f '{{range .Containers}}{{.Name}}{{end}}' bridge"
    )
    assert (code, output) == (0, "web\n"), output
    assert not _listening_on_host(port) and not _host_connects(port)
    assert not engine.inspect_container(sandbox.engine_name("web"))["HostConfig"].get("PortBindings")
    # The workstation and the forwarder share the session's labels, yet are none of the student's business.
    hidden = [sandbox.state["container_id"], *(f["Id"] for f in forwarders(engine, sandbox))]
    assert len(hidden) == 2
    assert sandbox.workstation.docker("docker ps -aq --no-trunc")[1].split() == [web_id]
    for container_id in hidden:
        code, output = sandbox.workstation.docker(f"docker exec -u 0 {container_id[:12]} id")
        assert code != 0 and f"No such container: {container_id[:12]}" in output, output
    # What the lesson page lists, as the gateway records it for the site.
    address = sandbox.address_of(sandbox.engine_name("web"))
    assert published_record(sandbox) == [(port, 80, "web", address)]

    code, output = run_web(sandbox, "web2", port)
    assert code == 125 and f"Bind for 0.0.0.0:{port} failed: port is already allocated" in output, output
    code, output = sandbox.workstation.docker(f"timeout 20 docker run --rm --name once -p {port}:80 busybox true")
    assert code == 125 and "port is already allocated" in output, output
    assert curl_in_workstation(sandbox, port)[1].strip() == "hello-from-web"
    # An image committed from a publishing container does not pass the ports on to its containers.
    code, output = sandbox.workstation.docker("docker commit web snap && docker run -d --name child snap sleep 60")
    assert code == 0, output
    listed = sandbox.workstation.docker("docker ps -a --format '{{.Names}}|{{.State}}|{{.Ports}}'")[1]
    assert listed.splitlines() == [
        "child|running|",
        "web2|created|",
        f"web|running|0.0.0.0:{port}->80/tcp, :::{port}->80/tcp",
    ]
    assert sandbox.workstation.docker("docker rm -f child")[0] == 0

    assert sandbox.workstation.docker("docker stop -t 0 web")[0] == 0
    code, output = sandbox.workstation.docker(f"curl -sS --max-time 2 localhost:{port}/")
    assert code == 7 and "Could not connect" in output, output
    assert forwarders(engine, sandbox, all_states=True) == []

    assert sandbox.workstation.docker("docker start web2")[0] == 0
    assert curl_in_workstation(sandbox, port)[1].strip() == "hello-from-web2"
    assert sandbox.workstation.docker("docker rm -f web2")[0] == 0
    assert sandbox.workstation.docker(f"curl -sS --max-time 2 localhost:{port}/")[0] == 7
    assert forwarders(engine, sandbox, all_states=True) == []
    assert published_record(sandbox) == []
    assert not _listening_on_host(port) and not _host_connects(port)

    # Published on one address, as typed: docker shows that address alone, and it answers in the shell.
    page = "mkdir -p /www && echo local > /www/index.html && exec httpd -f -p 80 -h /www"
    code, output = sandbox.workstation.docker(
        f"docker run -d --name local -p 127.0.0.1:{port}:80 busybox sh -c '{page}'"
    )
    assert code == 0, output
    assert curl_in_workstation(sandbox, port)[1].strip() == "local"
    ps = sandbox.workstation.docker("docker ps --format '{{.Names}} {{.Ports}}'")
    assert ps == (0, f"local 127.0.0.1:{port}->80/tcp\n"), ps
    bindings = sandbox.workstation.docker("docker inspect -f '{{json .HostConfig.PortBindings}}' local")
    assert json.loads(bindings[1]) == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}, bindings
    code, output = sandbox.workstation.docker(f"docker run -d -p 127.0.0.1:{port}:80 busybox true")
    assert code == 125 and f"Bind for 127.0.0.1:{port} failed: port is already allocated" in output, output
    assert sandbox.workstation.docker("docker rm -f local")[0] == 0
    assert not _listening_on_host(port) and not _host_connects(port)


def test_forwarders_outlive_a_gateway_restart_and_are_reconciled_after_it(
    sandbox_factory: Any, engine: docker.APIClient, gateway_process: GatewayProcess
) -> None:
    sandbox: LiveSandbox = sandbox_factory()
    port = free_host_port()
    assert run_web(sandbox, "web", port)[0] == 0
    assert curl_in_workstation(sandbox, port)[0] == 0
    gateway_process.kill()
    try:
        assert curl_in_workstation(sandbox, port, tries=1) == (0, "hello-from-web\n")
        # Stopped behind the gateway's back: the event is lost, and found again by the restarted gateway.
        engine.stop(sandbox.engine_name("web"), timeout=0)
    finally:
        gateway_process.start()
    _wait_for_socket(sandbox.socket)
    deadline = time.monotonic() + 15
    while forwarders(engine, sandbox, all_states=True) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert forwarders(engine, sandbox, all_states=True) == []
    assert sandbox.workstation.docker(f"curl -sS --max-time 2 localhost:{port}/")[0] == 7


@pytest.fixture
def published_web(sandbox_factory: Any, transactional_db: None) -> Iterator[dict[str, Any]]:
    """An owner's ready sandbox (as the site records it) whose container `web` publishes a port."""
    users = get_user_model().objects
    owner = users.create_user(username=f"owner{random.randrange(10**9)}", password="x")
    stranger = users.create_user(username=f"stranger{random.randrange(10**9)}", password="x")
    sandbox: LiveSandbox = sandbox_factory(owner_key=f"user-{owner.pk}")
    now = timezone.now()
    record = Sandbox.objects.create(
        pk=sandbox.session_id,
        owner_key=sandbox.owner_key,
        user=owner,
        image="layercake/workstation:latest",
        state=SandboxState.READY,
        last_activity_at=now,
        expires_at=now + timedelta(minutes=15),
    )
    port = free_host_port()
    assert run_web(sandbox, "web", port)[0] == 0
    assert curl_in_workstation(sandbox, port)[0] == 0
    script = base64.b64encode(CGI.encode()).decode()
    installed = sandbox.workstation.docker(
        f"echo {script} | docker exec -i web sh -c 'base64 -d > /www/cgi-bin/echo && chmod +x /www/cgi-bin/echo'"
    )
    assert installed[0] == 0, installed
    yield {"sandbox": sandbox, "record": record, "port": port, "owner": owner, "stranger": stranger}


async def _body(response: Any) -> bytes:
    if getattr(response, "streaming", False):
        return b"".join([chunk async for chunk in response.streaming_content])
    return bytes(response.content)


async def test_the_lesson_page_opens_a_published_port_for_its_owner_only(
    published_web: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pk, port = published_web["record"].pk, published_web["port"]
    url = reverse("sandbox:port", kwargs={"pk": pk, "port": port})
    assert url == f"/sandbox/{pk}/port/{port}/"
    owner = AsyncClient()
    await owner.aforce_login(published_web["owner"])

    response = await owner.get(url)
    assert response.status_code == 200
    assert (await _body(response)).strip() == b"hello-from-web"
    assert response["Content-Security-Policy"].startswith("sandbox ")
    assert "allow-same-origin" not in response["Content-Security-Policy"]
    assert response["Cache-Control"] == "no-store"

    response = await owner.get(url + "cgi-bin/echo", HTTP_COOKIE="sessionid=x")
    body = (await _body(response)).decode()
    assert response.status_code == 200 and body.startswith("cookie=[] "), body[:200]
    assert f"host=[localhost:{port}]" in body and f"prefix=[/sandbox/{pk}/port/{port}]" in body
    assert "planted" not in str(response.cookies) and "planted" not in str(response.headers)

    response = await owner.get(url + "cgi-bin/echo/go")
    assert response.status_code == 302 and response["Location"] == url + "index.html"
    head = await owner.head(url)
    assert head.status_code == 200 and await _body(head) == b""
    assert (await owner.post(url)).status_code == 405

    # Capped: cut short when the length is not known in advance, refused when it is.
    monkeypatch.setattr("sandbox.ports.PROXY_BODY_MAX", 64)
    cut = await owner.get(url + "cgi-bin/echo")
    assert cut.status_code == 200 and 0 < len(await _body(cut)) <= 64
    monkeypatch.setattr("sandbox.ports.PROXY_BODY_MAX", 8)
    refused = await owner.get(url)
    assert refused.status_code == 502 and b"larger than" in await _body(refused)

    stranger = AsyncClient()
    await stranger.aforce_login(published_web["stranger"])
    for client in (stranger, AsyncClient()):
        assert (await client.get(url)).status_code == 404
        assert (await client.get(reverse("sandbox:ports", kwargs={"pk": pk}))).status_code == 404
    assert (await owner.get(reverse("sandbox:port", kwargs={"pk": pk, "port": port + 1}))).status_code == 404

    fragment = await owner.get(reverse("sandbox:ports", kwargs={"pk": pk}))
    text = fragment.content.decode()
    assert fragment.status_code == 200 and f'href="{url}"' in text and "web:80" in text


@pytest.fixture
def record_naming_the_host(sandbox_factory: Any, transactional_db: None) -> Iterator[dict[str, Any]]:
    """A published ports record (as a tampered or broken one might be) naming this machine's address on a
    sandbox bridge, where a web app of this machine answers."""
    sandbox: LiveSandbox = sandbox_factory()
    server = TokenServer("0.0.0.0")
    owner = get_user_model().objects.create_user(username=f"owner{random.randrange(10**9)}", password="x")
    now = timezone.now()
    record = Sandbox.objects.create(
        owner_key=f"user-{owner.pk}",
        user=owner,
        image="layercake/workstation:latest",
        state=SandboxState.READY,
        last_activity_at=now,
        expires_at=now + timedelta(minutes=15),
    )
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"{settings.SANDBOX_NAMESPACE}:gateway:ports:{record.pk}"
    entry = {"port": 8080, "container_port": server.port, "container": "web", "address": sandbox.host_address()}
    client.set(key, json.dumps({"ports": [entry]}), ex=300)
    try:
        yield {"record": record, "owner": owner, "server": server, "address": sandbox.host_address()}
    finally:
        client.delete(key)
        client.close()
        server.stop()


async def test_the_proxy_never_connects_to_this_machine(record_naming_the_host: dict[str, Any]) -> None:
    server: TokenServer = record_naming_the_host["server"]
    owner = AsyncClient()
    await owner.aforce_login(record_naming_the_host["owner"])
    url = reverse("sandbox:port", kwargs={"pk": record_naming_the_host["record"].pk, "port": 8080})
    assert (await owner.get(url)).status_code == 404
    assert server.clients == []
    # The control: the app does answer at that address, for this machine itself.
    assert server.get(record_naming_the_host["address"]) == server.token


def test_a_port_held_in_the_shell_fails_the_start_as_docker_does(
    sandbox_factory: Any, engine: docker.APIClient
) -> None:
    sandbox: LiveSandbox = sandbox_factory()
    port = free_host_port()
    # A server of the student's own, in the shell, on the port.
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"
    listener = f"setsid socat {listen} SYSTEM:'echo HTTP/1.0 200 OK; echo; echo mine' </dev/null >/dev/null 2>&1 &"
    assert sandbox.workstation.docker(listener)[0] == 0
    assert curl_in_workstation(sandbox, port)[1].strip() == "mine"

    code, output = run_web(sandbox, "web", port)
    assert code == 125 and f"listen tcp4 0.0.0.0:{port}: bind: address already in use" in output, output
    assert sandbox.workstation.docker("docker ps -a --format '{{.Names}}|{{.State}}'")[1] == "web|created\n"
    assert forwarders(engine, sandbox, all_states=True) == []
    assert curl_in_workstation(sandbox, port)[1].strip() == "mine"
    code, output = sandbox.workstation.docker(f"timeout 20 docker run --rm --name once -p {port}:80 busybox true")
    assert code == 125 and "address already in use" in output, output
    assert "once" not in sandbox.workstation.docker("docker ps -a --format '{{.Names}}'")[1]

    assert sandbox.workstation.docker("pkill -x socat")[0] == 0
    assert sandbox.workstation.docker("docker start web")[0] == 0
    assert curl_in_workstation(sandbox, port)[1].strip() == "hello-from-web"
