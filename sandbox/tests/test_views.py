import re

import pytest
from django.test import Client, override_settings

from lessons.models import Lesson
from sandbox import services
from sandbox.backends.base import EngineUnavailable
from sandbox.models import EndReason, Sandbox, SandboxState

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
        assert "You already have 2 sandboxes running" in refused.content.decode()
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


def _running_listed(page: str) -> list[tuple[str, str, int]]:
    """Each sandbox a refusal offers to stop: its lesson's title, the link to that lesson, and the sandbox the
    form's button stops."""
    listed = page.split('class="sandbox-running"', 1)[1].split("</ul>", 1)[0] if "sandbox-running" in page else ""
    return [
        (title, href, int(pk))
        for href, title, pk in re.findall(
            r'<a href="([^"]+)">([^<]+)</a>.*?action="/sandbox/(\d+)/replace/"', listed, re.S
        )
    ]


@pytest.fixture
def three_lessons(lesson: Lesson) -> list[Lesson]:
    more = [Lesson.objects.create(slug=slug, title=slug.title(), body="text") for slug in ("two", "three")]
    return [lesson, *more]


def _start_for(client: Client, slug: str) -> int:
    return client.post("/sandbox/start/", {"lesson": slug}, HTTP_HX_REQUEST="true").status_code


@pytest.fixture
def student_at_the_cap(three_lessons: list[Lesson], settings, django_capture_on_commit_callbacks) -> Client:  # type: ignore[no-untyped-def]
    """A student with a sandbox on lessons one and two, as many as they may have."""
    settings.SANDBOX_PER_OWNER = 2
    student = Client()
    with django_capture_on_commit_callbacks(execute=False):
        assert [_start_for(student, slug) for slug in ("one", "two")] == [200, 200]
    return student


def test_the_refusal_links_each_running_sandbox_and_offers_to_stop_it_for_this_lesson(
    student_at_the_cap: Client, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks(execute=False):
        refused = student_at_the_cap.post("/sandbox/start/", {"lesson": "three"}, HTTP_HX_REQUEST="true")
    page = refused.content.decode()
    assert refused.status_code == 429
    one, two = (Sandbox.objects.get(lesson__slug=slug) for slug in ("one", "two"))
    assert _running_listed(page) == [("Two", "/lessons/two/", two.pk), ("One", "/lessons/one/", one.pk)]
    assert page.count('name="lesson" value="three"') == 3  # each stop-and-start button, and "Start sandbox"
    assert page.count('name="csrfmiddlewaretoken"') == 3
    assert f'hx-post="/sandbox/{one.pk}/replace/"' in page
    # Nothing is stopped until the student says which.
    assert Sandbox.objects.active().count() == 2


def test_stopping_a_listed_sandbox_starts_this_lessons_in_its_place(
    student_at_the_cap: Client, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    student = student_at_the_cap
    one = Sandbox.objects.get(lesson__slug="one")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = student.post(f"/sandbox/{one.pk}/replace/", {"lesson": "three"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    three = Sandbox.objects.get(lesson__slug="three")
    assert f'data-ws-path="/ws/sandbox/{three.pk}/terminal/"' in response.content.decode()
    one.refresh_from_db()
    assert (one.state, one.end_reason) == (SandboxState.STOPPING, EndReason.STOPPED)
    assert Sandbox.objects.get(lesson__slug="two").is_active
    assert len(callbacks) == 2  # one's teardown and three's launch
    assert "You stopped the sandbox." in student.get("/lessons/one/").content.decode()


def test_without_javascript_the_refusal_is_the_lesson_page_and_its_buttons_work(
    student_at_the_cap: Client, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    student = student_at_the_cap
    with django_capture_on_commit_callbacks(execute=False):
        refused = student.post("/sandbox/start/", {"lesson": "three"})
    page = refused.content.decode()
    assert refused.status_code == 429
    assert "<h1>Three</h1>" in page and "<html" in page
    two = Sandbox.objects.get(lesson__slug="two")
    assert [pk for _, _, pk in _running_listed(page)] == [two.pk, Sandbox.objects.get(lesson__slug="one").pk]
    with django_capture_on_commit_callbacks(execute=False):
        replaced = student.post(f"/sandbox/{two.pk}/replace/", {"lesson": "three"})
    assert replaced.status_code == 302 and replaced["Location"] == "/lessons/three/"
    three = Sandbox.objects.get(lesson__slug="three")
    assert f'data-sandbox-id="{three.pk}"' in student.get("/lessons/three/").content.decode()
    assert not Sandbox.objects.get(pk=two.pk).is_active


@override_settings(SANDBOX_PER_OWNER=2)
def test_only_the_owner_can_stop_a_sandbox_to_start_another(
    three_lessons: list[Lesson], django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    owner = Client()
    with django_capture_on_commit_callbacks(execute=False):
        _start_for(owner, "one")
        sandbox = Sandbox.objects.get()
        stranger = Client()
        _start_for(stranger, "two")
        for client in (stranger, Client()):
            response = client.post(f"/sandbox/{sandbox.pk}/replace/", {"lesson": "three"}, HTTP_HX_REQUEST="true")
            assert response.status_code == 404
    assert Client().get(f"/sandbox/{sandbox.pk}/replace/").status_code == 405
    assert Sandbox.objects.get(pk=sandbox.pk).is_active
    assert not Sandbox.objects.filter(lesson__slug="three").exists()


def test_stopping_a_sandbox_to_start_another_takes_the_sites_csrf_token(
    three_lessons: list[Lesson], django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    student = Client(enforce_csrf_checks=True)
    token = student.get("/lessons/one/").context["csrf_token"]
    with django_capture_on_commit_callbacks(execute=False):
        assert student.post("/sandbox/start/", {"lesson": "one", "csrfmiddlewaretoken": token}).status_code == 302
        sandbox = Sandbox.objects.get()
        assert student.post(f"/sandbox/{sandbox.pk}/replace/", {"lesson": "two"}).status_code == 403
        assert Sandbox.objects.get(pk=sandbox.pk).is_active
        replaced = student.post(f"/sandbox/{sandbox.pk}/replace/", {"lesson": "two", "csrfmiddlewaretoken": token})
    assert replaced.status_code == 302
    assert not Sandbox.objects.get(pk=sandbox.pk).is_active


@override_settings(SANDBOX_PER_OWNER=2, SANDBOX_PER_NETWORK=2)
def test_a_full_network_offers_only_the_students_own_sandboxes_there(
    three_lessons: list[Lesson], django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    student, classmate = Client(REMOTE_ADDR="203.0.113.7"), Client(REMOTE_ADDR="203.0.113.7")
    with django_capture_on_commit_callbacks(execute=False):
        _start_for(student, "one")
        _start_for(classmate, "one")
        theirs = classmate.post("/sandbox/start/", {"lesson": "two"}, HTTP_HX_REQUEST="true").content.decode()
        refused = student.post("/sandbox/start/", {"lesson": "two"}, HTTP_HX_REQUEST="true")
    mine = Sandbox.objects.get(owner_key=student.session["layercake_owner"])
    page = refused.content.decode()
    assert refused.status_code == 429
    assert "Every sandbox your network may have at once is in use." in theirs
    assert "Every sandbox your network may have at once is in use." in page and "stop one of yours" in page
    # Each is offered their own sandbox only, never the other's.
    assert [pk for _, _, pk in _running_listed(page)] == [mine.pk]
    assert [pk for _, _, pk in _running_listed(theirs)] == [Sandbox.objects.exclude(pk=mine.pk).get().pk]
    with django_capture_on_commit_callbacks(execute=False):
        response = student.post(f"/sandbox/{mine.pk}/replace/", {"lesson": "two"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and "data-terminal" in response.content.decode()


@override_settings(SANDBOX_PER_NETWORK=1)
def test_a_refused_replacement_keeps_the_sandbox_it_would_have_stopped(
    three_lessons: list[Lesson], django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    # The student started one at home and comes back from a network whose one sandbox is someone else's.
    student = Client(REMOTE_ADDR="198.51.100.1")
    with django_capture_on_commit_callbacks(execute=False):
        _start_for(student, "one")
        _start_for(Client(REMOTE_ADDR="203.0.113.7"), "two")
    mine = Sandbox.objects.get(lesson__slug="one")
    student.defaults["REMOTE_ADDR"] = "203.0.113.7"
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        refused = student.post(f"/sandbox/{mine.pk}/replace/", {"lesson": "three"}, HTTP_HX_REQUEST="true")
    page = refused.content.decode()
    assert refused.status_code == 429
    assert "Every sandbox your network may have at once is in use. Try again when someone there stops one." in page
    assert _running_listed(page) == []
    assert callbacks == []
    assert Sandbox.objects.get(pk=mine.pk).state == SandboxState.QUEUED
    assert not Sandbox.objects.filter(lesson__slug="three").exists()
