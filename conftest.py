"""Fixtures shared by every app's tests: the real engine, a real Redis, a real Celery worker, a real
ASGI server and the gateway, each cleaned up by label even when a test fails."""

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.gateway_process import GatewayProcess

# Set before Django reads its settings, so that every thread and child process of this run shares one namespace.
os.environ.setdefault("LAYERCAKE_SANDBOX_NAMESPACE", f"lctest{os.getpid()}")


def _purge_namespace() -> None:
    import docker
    import docker.errors
    from django.conf import settings

    client = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=60)
    mine = {"label": [f"layercake.namespace={settings.SANDBOX_NAMESPACE}"]}
    try:
        for container in client.api.containers(all=True, filters=mine):
            try:
                client.api.remove_container(container["Id"], force=True, v=True)
            except docker.errors.APIError as exc:
                if exc.status_code not in (404, 409):
                    raise
        for network in client.api.networks(filters=mine):
            try:
                client.api.remove_network(network["Id"])
            except docker.errors.APIError as exc:
                if exc.status_code not in (404, 409):
                    raise
        for volume in (client.api.volumes(filters=mine) or {}).get("Volumes") or []:
            try:
                client.api.remove_volume(volume["Name"], force=True)
            except docker.errors.APIError as exc:
                if exc.status_code not in (404, 409):
                    raise
    finally:
        client.close()


@pytest.fixture
def engine_cleanup() -> Iterator[None]:
    """Remove every engine object of this test run's namespace after the test, whatever happened."""
    yield
    _purge_namespace()


@pytest.fixture(scope="session", autouse=True)
def _engine_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if any(item.get_closest_marker("engine") for item in request.session.items):
        _purge_namespace()


@pytest.fixture
def celery_live_worker(transactional_db: None) -> Iterator[None]:
    """A real Celery worker, in this process, consuming this run's own queue on the real Redis broker."""
    from celery.contrib.testing.worker import start_worker

    from tutorial.celery import app

    app.control.purge()
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30):
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_asgi(celery_live_worker: None) -> Iterator[str]:
    """The site served by a real uvicorn on a loopback port, as `./layercake up` serves it."""
    import uvicorn
    from django.conf import settings

    from tutorial.asgi import HTTPProtocol, application

    port = _free_port()
    config = uvicorn.Config(
        application,
        host="127.0.0.1",
        port=port,
        http=HTTPProtocol,
        ws="websockets-sansio",
        ws_max_size=settings.TERMINAL_MAX_FRAME_BYTES + 1024,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def gateway_process() -> Iterator["GatewayProcess"]:
    """`manage.py gateway` of this test run, serving the sessions of its namespace."""
    import shutil
    from pathlib import Path

    from django.conf import settings

    from tests.gateway_process import GatewayProcess

    process = GatewayProcess()
    process.start()
    yield process
    process.stop()
    shutil.rmtree(Path(settings.GATEWAY_DIR), ignore_errors=True)
    process.log.unlink(missing_ok=True)
