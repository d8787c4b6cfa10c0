"""The deployment stack for real: docker-compose builds the site's image (on a base made on this machine, with
no registry), starts the stack in a project and namespace of this run alone, a student starts a sandbox through
the site and runs docker in their workstation through the gateway, and `docker-compose down -v` ends the
sandbox and leaves nothing of the stack on the engine."""

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest
from websockets.asyncio.client import connect

from sandbox.tests.test_terminal_live import Terminal

pytestmark = [pytest.mark.deploy, pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
# Kept between runs: the builder's cache makes the build of unchanged code take seconds.
SITE_IMAGE = "layercake/site:test"
LOCAL_BASE = "layercake/site-base:bookworm"
LESSON = "images-and-containers"


@dataclass
class Stack:
    project: str
    namespace: str
    url: str
    environment: dict[str, str]
    env_file: Path

    def compose(self, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *("docker-compose", "--project-directory", str(ROOT), "--env-file", str(self.env_file)),
                *("-p", self.project, *arguments),
            ],
            cwd=ROOT,
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def must(self, *arguments: str, timeout: float = 600) -> str:
        done = self.compose(*arguments, timeout=timeout)
        assert done.returncode == 0, f"docker-compose {' '.join(arguments)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _engine() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=60)


def _left_on_engine(client: docker.DockerClient, stack: Stack) -> list[str]:
    left = []
    for label in (f"com.docker.compose.project={stack.project}", f"layercake.namespace={stack.namespace}"):
        mine = {"label": [label]}
        left += [f"container {c['Names'][0]}" for c in client.api.containers(all=True, filters=mine)]
        left += [f"network {n['Name']}" for n in client.api.networks(filters=mine)]
        left += [f"volume {v['Name']}" for v in (client.api.volumes(filters=mine) or {}).get("Volumes") or []]
    return sorted(set(left))


def _purge(client: docker.DockerClient, stack: Stack) -> None:
    for label in (f"com.docker.compose.project={stack.project}", f"layercake.namespace={stack.namespace}"):
        mine = {"label": [label]}
        for container in client.api.containers(all=True, filters=mine):
            with _unless_gone():
                client.api.remove_container(container["Id"], force=True, v=True)
        for network in client.api.networks(filters=mine):
            with _unless_gone():
                client.api.remove_network(network["Id"])
        for volume in (client.api.volumes(filters=mine) or {}).get("Volumes") or []:
            with _unless_gone():
                client.api.remove_volume(volume["Name"], force=True)


@contextlib.contextmanager
def _unless_gone() -> Iterator[None]:
    """404 or 409: already gone, or still used by something else (an image built on it)."""
    try:
        yield
    except docker.errors.APIError as exc:
        if exc.status_code not in (404, 409):
            raise


def _base_image() -> str:
    """The official base where it is on the engine (or named), else one made here without a registry."""
    named = os.environ.get("LAYERCAKE_BASE_IMAGE")
    if named:
        return named
    done = subprocess.run([str(ROOT / "layercake"), "site-base"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"./layercake site-base failed:\n{done.stdout}\n{done.stderr}"
    return LOCAL_BASE


@pytest.fixture
def stack() -> Iterator[Stack]:
    run = secrets.token_hex(3)
    scratch = Path(tempfile.mkdtemp(prefix="lcdeploy-"))
    env_file = scratch / "empty.env"
    env_file.write_text("")
    port, redis_port = _free_port(), _free_port()
    # Nothing of the caller's own settings reaches the stack: only what this run sets.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LAYERCAKE_")}
    environment.pop("DJANGO_SETTINGS_MODULE", None)
    environment.update(
        {
            "COMPOSE_DOCKER_CLI_BUILD": "0",
            "DOCKER_BUILDKIT": "0",
            "LAYERCAKE_SECRET_KEY": secrets.token_urlsafe(32),
            "LAYERCAKE_SITE_IMAGE": SITE_IMAGE,
            "LAYERCAKE_BASE_IMAGE": _base_image(),
            "LAYERCAKE_SANDBOX_NAMESPACE": f"lcd{run}",
            "LAYERCAKE_HOST": "127.0.0.1",
            "LAYERCAKE_PORT": str(port),
            "LAYERCAKE_REDIS_PORT": str(redis_port),
            "LAYERCAKE_ALLOWED_HOSTS": "127.0.0.1",
            "LAYERCAKE_SECURE_COOKIES": "false",
            "LAYERCAKE_GATEWAY_DIR": str(scratch / "gateway"),
            "LAYERCAKE_IMAGE_SOURCE": "build",
            "LAYERCAKE_WORKERS": "2",
        }
    )
    made = Stack(f"lcdeploy{run}", f"lcd{run}", f"127.0.0.1:{port}", environment, env_file)
    client = _engine()
    try:
        yield made
    finally:
        made.compose("down", "-v", "--timeout", "120", timeout=300)
        _purge(client, made)
        client.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _build(stack: Stack) -> None:
    client = _engine()
    try:
        try:
            before = client.api.inspect_image(SITE_IMAGE)["Id"]
        except docker.errors.ImageNotFound:
            before = None
        # Every service runs this one image: building it for one builds it for all.
        stack.must("build", "web", timeout=900)
        after = client.api.inspect_image(SITE_IMAGE)["Id"]
        if before is not None and before != after:
            with _unless_gone():
                client.api.remove_image(before)
    finally:
        client.close()


def _wait_for_site(url: str, *, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(f"http://{url}/", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the site did not answer on {url}"
        time.sleep(0.5)


def _start_sandbox(site: httpx.Client) -> int:
    page = site.get(f"/lessons/{LESSON}/")
    assert page.status_code == 200
    token = site.cookies["csrftoken"]
    started = site.post(
        "/sandbox/start/", data={"lesson": LESSON}, headers={"X-CSRFToken": token, "HX-Request": "true"}
    )
    assert started.status_code == 200, started.text[:500]
    found = re.search(r'data-ws-path="/ws/sandbox/(\d+)/terminal/"', started.text)
    assert found, started.text[:500]
    return int(found.group(1))


async def _docker_in_the_workstation(url: str, pk: int, session: str) -> Terminal:
    headers = {"Origin": f"http://{url}", "Cookie": f"sessionid={session}"}
    async with connect(f"ws://{url}/ws/sandbox/{pk}/terminal/", additional_headers=headers, max_size=2**22) as ws:
        term = Terminal(ws)
        await term.hello()
        await term.until(lambda t: t.state() == "ready", within=120)
        await term.run("docker ps -a; echo DONE-$((6*7))", b"DONE-42")
        return term


def test_the_stack_serves_a_sandbox_and_leaves_nothing_behind(stack: Stack) -> None:
    timings: dict[str, float] = {}
    mark = time.monotonic()
    _build(stack)
    timings["build"] = time.monotonic() - mark

    mark = time.monotonic()
    stack.must("up", "-d", "--no-build", timeout=900)
    _wait_for_site(stack.url, within=120)
    timings["up"] = time.monotonic() - mark

    client = _engine()
    try:
        firewall = client.api.containers(
            all=True, filters={"label": [f"com.docker.compose.project={stack.project}", "layercake.role=firewall"]}
        )
        assert len(firewall) == 1
        assert client.api.inspect_container(firewall[0]["Id"])["State"]["ExitCode"] == 0
        assert b"The host firewall rule is in place" in client.api.logs(firewall[0]["Id"])

        mark = time.monotonic()
        with httpx.Client(base_url=f"http://{stack.url}", timeout=30) as site:
            pk = _start_sandbox(site)
            term = asyncio.run(_docker_in_the_workstation(stack.url, pk, site.cookies["sessionid"]))
        timings["sandbox"] = time.monotonic() - mark
        screen = bytes(term.screen)
        # The student's docker answered through the gateway: the header of an (empty) listing, no error.
        assert b"CONTAINER ID" in screen, screen[-800:]
        assert b"Cannot connect" not in screen, screen[-800:]
        workstation = client.api.inspect_container(f"{stack.namespace}-sb-{pk}")
        assert workstation["State"]["Running"]
        assert workstation["Config"]["Labels"]["layercake.role"] == "workstation"

        mark = time.monotonic()
        # The site stops first and ends the sandboxes while the gateway and Redis still run.
        stack.must("stop", "--timeout", "120", timeout=300)
        assert "1 sandboxes ended" in stack.must("logs", "--no-color", "web")
        assert "Images ready: busybox:latest" in stack.must("logs", "--no-color", "setup")
        with pytest.raises(docker.errors.NotFound):
            client.api.inspect_container(f"{stack.namespace}-sb-{pk}")
        stack.must("down", "-v", "--timeout", "120", timeout=300)
        timings["down"] = time.monotonic() - mark
        assert _left_on_engine(client, stack) == []
    finally:
        client.close()
    print("timings: " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))
