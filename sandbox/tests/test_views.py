import pytest
from django.test import Client, override_settings

from lessons.models import Lesson
from sandbox import services
from sandbox.backends.base import EngineUnavailable
from sandbox.models import Sandbox

from .fakes import MemoryBackend

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("memory_backend")]


@pytest.fixture
def lesson() -> Lesson:
    return Lesson.objects.create(slug="one", title="One", body="text")


def test_start_renders_the_terminal_panel(lesson: Lesson, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    sandbox = Sandbox.objects.get()
    assert f'data-ws-path="/ws/sandbox/{sandbox.pk}/terminal/"' in response.content.decode()


def test_start_without_javascript_returns_to_the_lesson(
    lesson: Lesson, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks(execute=False):
        response = Client().post("/sandbox/start/", {"lesson": "one"})
    assert response.status_code == 302 and response["Location"] == lesson.get_absolute_url()


def test_an_unknown_lesson_cannot_be_started() -> None:
    assert Client().post("/sandbox/start/", {"lesson": "nope"}).status_code == 404


def test_a_full_host_says_try_again_shortly(lesson: Lesson, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    with override_settings(SANDBOX_CAPACITY=1), django_capture_on_commit_callbacks(execute=False):
        Client().post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
        response = Client().post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 503
    assert response["Retry-After"] == "30"
    assert "Try again in a minute" in response.content.decode()


def test_engine_down_is_shown_plainly(lesson: Lesson, memory_backend: type[MemoryBackend]) -> None:
    memory_backend.fail_with = EngineUnavailable("connection refused")
    client = Client()
    client.post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
    sandbox = Sandbox.objects.get()
    services.sandbox_launch(sandbox_id=sandbox.pk)
    page = client.get(f"/sandbox/{sandbox.pk}/").content.decode()
    assert "The container engine is not reachable right now." in page
    assert "Start a fresh sandbox" in page


def test_only_the_owner_can_see_or_stop_a_sandbox(lesson: Lesson, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    owner = Client()
    with django_capture_on_commit_callbacks(execute=False):
        owner.post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
    sandbox = Sandbox.objects.get()
    stranger = Client()
    assert stranger.get(f"/sandbox/{sandbox.pk}/").status_code == 404
    assert stranger.post(f"/sandbox/{sandbox.pk}/stop/").status_code == 404
    assert owner.get(f"/sandbox/{sandbox.pk}/").status_code == 200


@override_settings(SANDBOX_PER_OWNER=2)
def test_one_owner_cannot_fill_the_host(lesson: Lesson, django_capture_on_commit_callbacks) -> None:  # type: ignore[no-untyped-def]
    for slug in ("two", "three"):
        Lesson.objects.create(slug=slug, title=slug.title(), body="text")
    student = Client()
    with django_capture_on_commit_callbacks(execute=False):
        for slug in ("one", "two"):
            assert student.post("/sandbox/start/", {"lesson": slug}, HTTP_HX_REQUEST="true").status_code == 200
        refused = student.post("/sandbox/start/", {"lesson": "three"}, HTTP_HX_REQUEST="true")
        assert refused.status_code == 429
        assert "You already have 2 sandboxes running (“Two”, “One”)" in refused.content.decode()
        # The sandbox the owner already has is theirs to come back to, and another student is not held back.
        assert student.post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true").status_code == 200
        assert Client().post("/sandbox/start/", {"lesson": "three"}, HTTP_HX_REQUEST="true").status_code == 200
    assert Sandbox.objects.count() == 3


@override_settings(SANDBOX_PER_OWNER=2, SANDBOX_PER_NETWORK=3)
def test_one_network_cannot_fill_the_host_by_throwing_its_cookies_away(
    lesson: Lesson, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    def start(address: str) -> int:
        # A new client each time: no cookie, so a new owner.
        return (
            Client(REMOTE_ADDR=address)
            .post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
            .status_code
        )

    with django_capture_on_commit_callbacks(execute=False):
        assert [start("203.0.113.7") for _ in range(4)] == [200, 200, 200, 429]
        # One machine of IPv6 holds a whole /64; another network is not held back.
        assert [start(f"2001:db8:1:2::{n}") for n in range(1, 5)] == [200, 200, 200, 429]
        assert start("2001:db8:1:3::1") == 200
        assert start("198.51.100.1") == 200
    refused = Client(REMOTE_ADDR="203.0.113.7").post("/sandbox/start/", {"lesson": "one"}, HTTP_HX_REQUEST="true")
    assert "Every sandbox your network may have at once is in use" in refused.content.decode()
    assert Sandbox.objects.count() == 8
