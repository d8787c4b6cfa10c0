"""What one student could do to the site, or through it to the shared engine and to other students, refused."""

import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import Client, override_settings
from django.utils import timezone
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from lessons.models import Lesson
from sandbox import protocol
from sandbox.models import Sandbox
from sandbox.owners import SESSION_KEY
from sandbox.terminal import RESIZE_INTERVAL
from sandbox.tests.test_terminal_live import Terminal, _start, _ws
from tutorial.websocket import is_same_origin

BASE_DIR = Path(__file__).resolve().parents[2]


def _settings_of(module: str, **env: str) -> tuple[int, str]:
    """Load a settings module in a fresh process, as the launcher does: its exit code and DEBUG or its error."""
    script = "from django.conf import settings; print('DEBUG', settings.DEBUG)"
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("LAYERCAKE_") and k != "DJANGO_SETTINGS_MODULE"
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env={**clean, "DJANGO_SETTINGS_MODULE": module, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()[-1]


def test_a_site_that_answers_to_others_is_not_in_debug_mode_nor_on_a_public_key() -> None:
    assert _settings_of("tutorial.settings.local") == (0, "DEBUG True")
    public = {"LAYERCAKE_ALLOWED_HOSTS": "lessons.example.org"}
    code, said = _settings_of("tutorial.settings.local", **public)
    assert code != 0 and "LAYERCAKE_SECRET_KEY must be set" in said
    for placeholder in ("change-me", "layercake-local-development-key-not-for-production"):
        code, said = _settings_of("tutorial.settings.local", **public, LAYERCAKE_SECRET_KEY=placeholder)
        assert code != 0 and "LAYERCAKE_SECRET_KEY must be set" in said
        code, said = _settings_of("tutorial.settings.production", LAYERCAKE_SECRET_KEY=placeholder)
        assert code != 0 and "LAYERCAKE_SECRET_KEY must be set" in said
    secret = {**public, "LAYERCAKE_SECRET_KEY": "s3cr3t-" * 8}
    assert _settings_of("tutorial.settings.local", **secret) == (0, "DEBUG False")
    # Listening on every address with the default names: any client can still say `Host: localhost`.
    code, said = _settings_of("tutorial.settings.local", LAYERCAKE_HOST="0.0.0.0")
    assert code != 0 and "LAYERCAKE_SECRET_KEY must be set" in said
    listening = {"LAYERCAKE_HOST": "0.0.0.0", "LAYERCAKE_SECRET_KEY": "s3cr3t-" * 8}
    assert _settings_of("tutorial.settings.local", **listening) == (0, "DEBUG False")
    assert _settings_of("tutorial.settings.production", **secret) == (0, "DEBUG False")


@pytest.fixture
def lesson() -> Lesson:
    return Lesson.objects.create(slug="live", title="Live", body="text", image="layercake/shell:latest")


def _owner_of(browser: Client) -> str:
    """What starting a sandbox leaves in a browser's session: the key of the owner it now is."""
    session = browser.session
    session[SESSION_KEY] = f"anon-{secrets.token_urlsafe(18)}"
    session.save()
    return str(session[SESSION_KEY])


def _engine_resizes(session_id: int, since: float) -> int:
    engine = docker.APIClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=30)
    filters = {"event": "resize", "label": [f"layercake.session={session_id}"]}
    try:
        events = engine.events(since=int(since), until=int(time.time()) + 1, filters=filters, decode=True)
        return sum(1 for _ in events)
    finally:
        engine.close()


@pytest.mark.engine
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.usefixtures("engine_cleanup")
def test_a_flood_of_resizes_reaches_the_engine_coalesced(live_asgi: str, lesson: Lesson) -> None:
    client = Client()
    sandbox = _start(client, lesson)

    async def session() -> float:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello()
            await term.until(lambda t: t.state() == "ready", within=60)
            await term.run("stty size", b"30 100")
            started = time.time()
            for i in range(500):
                await ws.send(protocol.resize_frame(80 + i % 40, 24 + i % 10))
            await ws.send(protocol.resize_frame(123, 45))
            await term.run("sleep 1; stty size", b"45 123")
            return started

    started = asyncio.run(session())
    assert 1 <= _engine_resizes(sandbox.pk, started - 1) <= 12


@pytest.mark.redis
def test_the_terminal_answers_only_pages_of_the_site_itself(live_asgi: str, lesson: Lesson) -> None:
    browser = Client()
    now = timezone.now()
    sandbox = Sandbox.objects.create(
        owner_key=_owner_of(browser), lesson=lesson, image="x", last_activity_at=now, expires_at=now
    )
    url = f"ws://{live_asgi}{sandbox.terminal_path}"
    cookie = {"Cookie": f"sessionid={browser.cookies['sessionid'].value}"}

    async def status(headers: dict[str, str]) -> int | str:
        try:
            async with connect(url, additional_headers=headers, open_timeout=10) as ws:
                await ws.send(protocol.hello_frame(has_screen=False, offset=0))
                frame = await asyncio.wait_for(ws.recv(), 10)
                assert isinstance(frame, bytes) and frame[0] == protocol.STATUS
                return "open"
        except InvalidStatus as refused:
            return refused.response.status_code

    # A sandboxed page served by the port proxy has the origin "null"; the others are other sites. A browser
    # sends the site's cookies from a page on any port of its host, and from an https page of it.
    host, port = live_asgi.rsplit(":", 1)
    origins = [
        None,
        "null",
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example",
        "http://evil.example",
        f"http://{host}:{int(port) + 1}",
        f"http://{host}",
        f"https://{live_asgi}",
        f"http://localhost:{port}",
    ]
    for origin in origins:
        headers = {**cookie, "Origin": origin} if origin else cookie
        assert asyncio.run(status(headers)) == 403, origin
    assert asyncio.run(status({**cookie, "Origin": f"http://{live_asgi}"})) == "open"


@pytest.mark.django_db
def test_starting_and_stopping_take_the_sites_own_csrf_token(lesson: Lesson) -> None:
    browser = Client(enforce_csrf_checks=True)
    page = browser.get(lesson.get_absolute_url())
    token = page.context["csrf_token"]
    assert browser.post("/sandbox/start/", {"lesson": lesson.slug}).status_code == 403
    forged = browser.post("/sandbox/start/", {"lesson": lesson.slug, "csrfmiddlewaretoken": "x" * 32})
    assert forged.status_code == 403
    now = timezone.now()
    sandbox = Sandbox.objects.create(
        owner_key=_owner_of(browser), lesson=lesson, image="x", last_activity_at=now, expires_at=now
    )
    from_elsewhere = browser.post(
        f"/sandbox/{sandbox.pk}/stop/", {"csrfmiddlewaretoken": token}, HTTP_ORIGIN="null", secure=True
    )
    assert from_elsewhere.status_code == 403
    assert Sandbox.objects.get(pk=sandbox.pk).state == "queued"


@pytest.mark.django_db
@override_settings(SANDBOX_PER_NETWORK=1)
def test_a_visitor_who_starts_nothing_leaves_no_session_behind(
    lesson: Lesson, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    # Sessions are rows that live for weeks: one per cookieless request would let any crawler or script grow
    # the database, and take its write lock, as fast as it can send requests.
    now = timezone.now()
    theirs = Sandbox.objects.create(
        owner_key=f"anon-{secrets.token_urlsafe(18)}",
        lesson=lesson,
        image="x",
        last_activity_at=now,
        expires_at=now,
    )
    for url in (
        lesson.get_absolute_url(),
        f"/sandbox/{theirs.pk}/",
        f"/sandbox/{theirs.pk}/ports/",
        f"/sandbox/{theirs.pk}/port/8080/",
    ):
        response = Client().get(url)
        assert response.status_code in (200, 404), url
        assert settings.SESSION_COOKIE_NAME not in response.cookies, url
    assert Session.objects.count() == 0
    with django_capture_on_commit_callbacks(execute=False):
        assert Client().post("/sandbox/start/", {"lesson": lesson.slug}, HTTP_HX_REQUEST="true").status_code == 200
        assert Session.objects.count() == 1
        refused = Client().post("/sandbox/start/", {"lesson": lesson.slug}, HTTP_HX_REQUEST="true")
    assert refused.status_code == 429
    assert settings.SESSION_COOKIE_NAME not in refused.cookies and Session.objects.count() == 1


@pytest.mark.engine
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.usefixtures("engine_cleanup")
def test_resizes_reach_the_engine_coalesced_however_many_times_the_terminal_reconnects(
    live_asgi: str, lesson: Lesson
) -> None:
    # Coalescing within one websocket is not enough: each new one would otherwise tell the engine its size at
    # once, so a script reconnecting in a loop would call the shared engine as fast as it can open websockets.
    client = Client()
    sandbox = _start(client, lesson)
    connections = 100

    async def session() -> tuple[float, float]:
        async def attach(ws: ClientConnection, cols: int, rows: int) -> Terminal:
            term = Terminal(ws)
            await term.hello(cols=cols, rows=rows)
            await term.until(lambda t: t.replays == 1, within=60)
            return term

        async with _ws(live_asgi, sandbox.pk, client) as ws:
            await attach(ws, 100, 30)
        started = time.time()
        for i in range(connections):
            async with _ws(live_asgi, sandbox.pk, client) as ws:
                await attach(ws, 80 + i % 40, 24 + i % 10)
        elapsed = time.time() - started
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            last = await attach(ws, 123, 45)
            await last.run("sleep 1; stty size", b"45 123")
        return started, elapsed

    started, elapsed = asyncio.run(session())
    assert elapsed < connections * RESIZE_INTERVAL / 2, "the reconnects were too slow to show anything"
    assert 1 <= _engine_resizes(sandbox.pk, started - 1) <= elapsed / RESIZE_INTERVAL + 4


@pytest.mark.parametrize(
    ("scheme", "host", "origin", "answered"),
    [
        ("ws", "127.0.0.1:8000", "http://127.0.0.1:8000", True),
        ("ws", "127.0.0.1:8000", "http://127.0.0.1:8001", False),
        ("ws", "127.0.0.1:8000", "https://127.0.0.1:8000", False),
        ("wss", "layercake.example", "https://layercake.example", True),
        ("wss", "layercake.example:443", "https://layercake.example", True),
        ("ws", "layercake.example:80", "http://layercake.example", True),
        ("ws", "other.example", "https://other.example", False),
        ("ws", "internal:8000", "https://layercake.example", True),  # behind a proxy, trusted
        ("ws", "127.0.0.1:8000", "", False),
    ],
)
@override_settings(CSRF_TRUSTED_ORIGINS=["https://layercake.example"])
def test_a_websocket_is_answered_only_from_the_sites_own_origin_or_a_trusted_one(
    scheme: str, host: str, origin: str, answered: bool
) -> None:
    headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
    assert is_same_origin({"type": "websocket", "scheme": scheme, "headers": headers}) is answered
