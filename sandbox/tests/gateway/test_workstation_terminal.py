"""The lesson terminal in the student's workstation: the spine and the gateway together, for real."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest
import redis
from django.conf import settings
from django.test import Client, override_settings
from websockets.asyncio.client import ClientConnection

from lessons.models import Lesson
from sandbox import protocol
from sandbox.gateway.config import gateway_config
from sandbox.models import Sandbox
from sandbox.tests.test_terminal_live import Terminal, _start, _ws, wait_until_ended

from .conftest import WORKSTATION_IMAGE, GatewayProcess

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis, pytest.mark.slow]


def _session_objects(session_id: int) -> list[str]:
    engine = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL)
    # This test run's only: another run on the engine numbers its sessions alike.
    ours = {"label": [f"layercake.session={session_id}", f"layercake.namespace={settings.SANDBOX_NAMESPACE}"]}
    try:
        found = [c["Names"][0] for c in engine.api.containers(all=True, filters=ours)]
        found += [i["Id"] for i in engine.api.images(filters=ours)]
        found += [n["Name"] for n in engine.api.networks(filters=ours)]
        return found
    finally:
        engine.close()


def _workstation_sandbox(slug: str) -> tuple[Client, Sandbox]:
    """A sandbox started from a lesson page whose image is the workstation, and the student's client."""
    lesson = Lesson.objects.create(slug=slug, title=slug.title(), body="text", image=WORKSTATION_IMAGE)
    client = Client()
    return client, _start(client, lesson)


@contextlib.asynccontextmanager
async def _at_the_prompt(
    live_asgi: str, sandbox: Sandbox, client: Client
) -> AsyncIterator[tuple[ClientConnection, Terminal]]:
    """The sandbox's terminal, once the workstation has printed its welcome and its first prompt."""
    async with _ws(live_asgi, sandbox.pk, client) as ws:
        term = Terminal(ws)
        await term.hello()
        await term.until(lambda t: t.state() == "ready", within=60)
        await term.until(lambda t: b"Welcome to your Layercake workstation" in t.screen and b"$ " in t.screen)
        yield ws, term


@pytest.mark.usefixtures("engine_cleanup")
def test_the_terminal_opens_in_the_workstation_with_a_working_docker(
    live_asgi: str, gateway_process: GatewayProcess
) -> None:
    client, sandbox = _workstation_sandbox("docker")

    async def session() -> None:
        async with _at_the_prompt(live_asgi, sandbox, client) as (_, term):
            # The welcome is printed before anyone types, and nothing wipes it: the gate's byte is not echoed.
            assert b"\x1b[2J" not in term.screen and b"^L" not in term.screen and b"^M" not in term.screen
            await term.run("id -u; echo $DOCKER_HOST", b"unix:///run/layercake/docker.sock")
            await term.run("docker ps -a", b"CONTAINER ID")
            await term.run("docker run --name mine busybox echo hello-$((40+2))", b"hello-42")
            await term.run("docker ps -a --format '{{.Names}} {{.Status}}'", b"mine Exited (0)")

    asyncio.run(session())
    assert _session_objects(sandbox.pk), "the student's container should exist until the sandbox ends"

    client.post(f"/sandbox/{sandbox.pk}/stop/", HTTP_HX_REQUEST="true")
    wait_until_ended(sandbox)
    assert _session_objects(sandbox.pk) == []
    assert not (Path(settings.GATEWAY_DIR) / str(sandbox.pk)).exists()


@pytest.mark.usefixtures("engine_cleanup")
def test_one_exit_too_many_only_warns_and_an_exit_right_after_it_leaves(
    live_asgi: str, gateway_process: GatewayProcess
) -> None:
    """Leaving the workstation's shell ends the sandbox, an easy slip after leaving a container's shell."""
    client, sandbox = _workstation_sandbox("leave")

    async def session() -> None:
        async with _at_the_prompt(live_asgi, sandbox, client) as (ws, term):
            await term.run("docker run -it --rm busybox sh -c 'echo inside-$((2+2))'", b"inside-4")
            await term.until(lambda t: bytes(t.screen).rstrip().endswith(b"$"))
            await term.run("(exit 3); echo subshell-$?", b"subshell-3")
            await term.run("exit", b"Type exit again to leave.")
            await term.run("echo still-$((1+1))", b"still-2")
            # An exit that does not follow a warned one warns again; the one right after it leaves.
            await term.run("exit", b"Type exit again to leave.")
            await ws.send(protocol.input_frame(b"exit\r"))
            assert await term.closed() == protocol.CLOSE_ENDED
            assert term.states[-1]["reason"] == "exited"

    asyncio.run(session())
    wait_until_ended(sandbox)
    assert _session_objects(sandbox.pk) == []


@pytest.mark.usefixtures("engine_cleanup")
def test_the_terminal_passes_on_what_the_student_does_and_when_the_ports_change(
    live_asgi: str, gateway_process: GatewayProcess
) -> None:
    """The page follows the sandbox through its terminal: each thing the student does, as the gateway publishes
    it, and the published ports each time they change, so that the page's list of them is fetched at once."""
    client, sandbox = _workstation_sandbox("events")

    def kinds(term: Terminal) -> list[object]:
        return [event["type"] for event in term.events]

    def ports(term: Terminal) -> list[object]:
        return [event["ports"] for event in term.events if event["type"] == "ports.changed"]

    async def session() -> None:
        async with _at_the_prompt(live_asgi, sandbox, client) as (_, term):
            await term.run("docker run -d --name web -p 8080:80 busybox httpd -f -p 80", b"\n")
            await term.until(lambda t: "container.started" in kinds(t) and len(ports(t)) == 1)
            assert ports(term) == [[{"port": 8080, "container": "web", "container_port": 80}]]
            started = next(e for e in term.events if e["type"] == "container.started")
            assert started["name"] == "web" and started["image"] == "busybox", started
            # Another sandbox's events go to its own terminals only.
            publisher = redis.Redis.from_url(settings.REDIS_URL)
            try:
                other = gateway_config().events_channel(sandbox.pk + 1)
                publisher.publish(other, json.dumps({"type": "container.started", "name": "theirs"}))
            finally:
                publisher.close()
            await term.run("docker rm -f web", b"web")
            await term.until(lambda t: len(ports(t)) == 2 and "container.removed" in kinds(t))
            assert ports(term)[-1] == []
            assert all(event.get("name") != "theirs" for event in term.events), term.events

    asyncio.run(session())
    client.post(f"/sandbox/{sandbox.pk}/stop/", HTTP_HX_REQUEST="true")
    wait_until_ended(sandbox)


@pytest.mark.usefixtures("engine_cleanup")
def test_the_terminal_says_when_the_sandbox_goes_over_its_disk_budget_and_when_it_is_back_within(
    live_asgi: str, gateway_process: GatewayProcess
) -> None:
    with override_settings(SANDBOX_STUDENT_DISK_MB=16):
        client, sandbox = _workstation_sandbox("disk")

        def of(term: Terminal, kind: str) -> list[dict[str, object]]:
            return [event for event in term.events if event["type"] == kind]

        async def session() -> None:
            async with _at_the_prompt(live_asgi, sandbox, client) as (_, term):
                fill = "sh -c 'dd if=/dev/zero of=/fill bs=1M count=24 2>/dev/null; sleep 600'"
                await term.run(f"docker run -d --name filler busybox {fill}", b"\n")
                await term.until(lambda t: bool(of(t, "disk.full")))
                full = of(term, "disk.full")[0]
                assert full["budget"] == 16 * 1024 * 1024 and int(str(full["used"])) > 16 * 1024 * 1024, full
                assert "more than the 16 MB it may" in str(full["message"])
                assert "what was writing was stopped" in str(full["message"])
                await term.run("docker rm -f filler", b"filler")
                await term.until(lambda t: bool(of(t, "disk.freed")))

        asyncio.run(session())
    client.post(f"/sandbox/{sandbox.pk}/stop/", HTTP_HX_REQUEST="true")
    wait_until_ended(sandbox)
