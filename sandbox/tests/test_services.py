from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from lessons.models import Lesson
from sandbox import services
from sandbox.backends.base import EngineUnavailable
from sandbox.models import EndReason, Sandbox, SandboxState

from .fakes import MemoryBackend

pytestmark = pytest.mark.django_db


@pytest.fixture
def lesson() -> Lesson:
    return Lesson.objects.create(slug="one", title="One", body="text")


def _start(lesson: Lesson, owner: str = "anon-a", *, launch: bool = True) -> Sandbox:
    sandbox = services.sandbox_start(owner_key=owner, user=None, lesson=lesson)
    if launch:
        services.sandbox_launch(sandbox_id=sandbox.pk)
        sandbox.refresh_from_db()
    return sandbox


def test_start_queues_a_launch_after_commit(
    memory_backend: type[MemoryBackend], lesson: Lesson, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks() as callbacks:
        sandbox = services.sandbox_start(owner_key="anon-a", user=None, lesson=lesson)
    assert sandbox.state == SandboxState.QUEUED
    assert len(callbacks) == 1


def test_launch_goes_to_ready(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    sandbox = _start(lesson)
    assert sandbox.state == SandboxState.READY
    assert sandbox.pk in memory_backend.running


def test_starting_again_returns_the_live_sandbox(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    first = _start(lesson)
    assert _start(lesson, launch=False).pk == first.pk
    assert _start(lesson, owner="anon-b", launch=False).pk != first.pk


def test_a_full_host_says_so(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    with override_settings(SANDBOX_CAPACITY=1):
        _start(lesson, owner="anon-a")
        with pytest.raises(services.SandboxFull, match="Try again"):
            _start(lesson, owner="anon-b")


def test_engine_down_fails_with_a_clear_reason(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    memory_backend.fail_with = EngineUnavailable("connection refused")
    sandbox = _start(lesson)
    assert sandbox.state == SandboxState.FAILED
    assert sandbox.end_reason == EndReason.ENGINE_DOWN
    assert "not reachable" in services.sandbox_message(sandbox=sandbox)


def test_stop_then_teardown_removes_it(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    sandbox = _start(lesson)
    services.sandbox_stop(sandbox=sandbox, reason=EndReason.STOPPED)
    services.sandbox_teardown(sandbox_id=sandbox.pk)
    services.sandbox_teardown(sandbox_id=sandbox.pk)
    sandbox.refresh_from_db()
    assert sandbox.state == SandboxState.ENDED
    assert sandbox.end_reason == EndReason.STOPPED
    assert memory_backend.running == {}


def test_reap_ends_idle_and_expired_sandboxes_and_orphans(
    memory_backend: type[MemoryBackend], lesson: Lesson
) -> None:
    idle = _start(lesson, owner="anon-idle")
    old = _start(lesson, owner="anon-old")
    fresh = _start(lesson, owner="anon-fresh")
    Sandbox.objects.filter(pk=idle.pk).update(last_activity_at=timezone.now() - timedelta(hours=2))
    Sandbox.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    memory_backend.running[999] = memory_backend.running[fresh.pk]
    report = services.sandbox_reap()
    assert report.idle == [idle.pk]
    assert report.expired == [old.pk]
    assert "sandbox 999" in report.removed
    assert set(memory_backend.running) == {fresh.pk}
    idle.refresh_from_db()
    assert (idle.state, idle.end_reason) == (SandboxState.ENDED, EndReason.IDLE)
    assert services.sandbox_reap().removed == []


def test_reap_notices_a_vanished_container(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    sandbox = _start(lesson)
    memory_backend.running.clear()
    assert services.sandbox_reap().vanished == [sandbox.pk]
    sandbox.refresh_from_db()
    assert sandbox.end_reason == EndReason.VANISHED


def test_a_sandbox_stopped_during_its_launch_is_not_revived(
    memory_backend: type[MemoryBackend], lesson: Lesson
) -> None:
    sandbox = _start(lesson, launch=False)
    original_start = memory_backend.start

    def start_then_stopped(self, spec, *, progress):  # type: ignore[no-untyped-def]
        state = original_start(self, spec, progress=progress)
        services.sandbox_stop(sandbox=Sandbox.objects.get(pk=spec.session_id), reason=EndReason.STOPPED)
        return state

    memory_backend.start = start_then_stopped  # type: ignore[method-assign]
    try:
        services.sandbox_launch(sandbox_id=sandbox.pk)
    finally:
        memory_backend.start = original_start  # type: ignore[method-assign]
    sandbox.refresh_from_db()
    assert sandbox.state == SandboxState.STOPPING
    assert memory_backend.running == {}


def test_a_sandbox_stopped_before_its_container_starts_stops_the_launch(
    memory_backend: type[MemoryBackend], lesson: Lesson
) -> None:
    sandbox = _start(lesson, launch=False)
    services.sandbox_stop(sandbox=sandbox, reason=EndReason.STOPPED)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=SandboxState.QUEUED)
    original_advance = services._advance

    def advance_then_stop(target: Sandbox, state: SandboxState, **fields: object) -> bool:
        if state == SandboxState.STARTING:
            Sandbox.objects.filter(pk=target.pk).update(state=SandboxState.STOPPING)
        return original_advance(target, state, **fields)

    services._advance = advance_then_stop  # type: ignore[assignment]
    try:
        services.sandbox_launch(sandbox_id=sandbox.pk)
    finally:
        services._advance = original_advance  # type: ignore[assignment]
    assert memory_backend.running == {}
    assert Sandbox.objects.get(pk=sandbox.pk).state == SandboxState.STOPPING


def test_ending_the_site_ends_every_live_sandbox(memory_backend: type[MemoryBackend], lesson: Lesson) -> None:
    live = _start(lesson, owner="anon-live")
    stopping = _start(lesson, owner="anon-stopping")
    services.sandbox_stop(sandbox=stopping, reason=EndReason.STOPPED)
    assert sorted(services.sandbox_end_all(reason=EndReason.SHUTDOWN)) == sorted([live.pk, stopping.pk])
    assert memory_backend.running == {}
    live.refresh_from_db()
    stopping.refresh_from_db()
    assert (live.state, live.end_reason) == (SandboxState.ENDED, EndReason.SHUTDOWN)
    assert (stopping.state, stopping.end_reason) == (SandboxState.ENDED, EndReason.STOPPED)
    assert services.sandbox_end_all(reason=EndReason.SHUTDOWN) == []


@override_settings(SANDBOX_PER_OWNER=2)
def test_at_the_cap_the_refusal_names_the_owners_sandboxes_and_stops_none(
    memory_backend: type[MemoryBackend], lesson: Lesson
) -> None:
    two = Lesson.objects.create(slug="two", title="Two", body="text")
    three = Lesson.objects.create(slug="three", title="Three", body="text")
    first, second = _start(lesson), _start(two)
    _start(three, owner="anon-b")
    with pytest.raises(services.TooManySandboxes, match="You already have 2 sandboxes running") as refused:
        _start(three)
    assert [sandbox.pk for sandbox in refused.value.stoppable] == [second.pk, first.pk]
    assert Sandbox.objects.active().filter(owner_key="anon-a").count() == 2


@override_settings(SANDBOX_PER_OWNER=2)
def test_replacing_stops_the_chosen_sandbox_and_starts_the_lesson(
    memory_backend: type[MemoryBackend], lesson: Lesson, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    two = Lesson.objects.create(slug="two", title="Two", body="text")
    three = Lesson.objects.create(slug="three", title="Three", body="text")
    first, second = _start(lesson), _start(two)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        started = services.sandbox_replace(sandbox=first, user=None, lesson=three)
    assert len(callbacks) == 2  # the teardown of one, the launch of the other, once both are committed
    services.sandbox_teardown(sandbox_id=first.pk)
    services.sandbox_launch(sandbox_id=started.pk)
    first.refresh_from_db()
    assert (started.owner_key, started.lesson) == ("anon-a", three)
    assert Sandbox.objects.get(pk=started.pk).state == SandboxState.READY
    assert (first.state, first.end_reason) == (SandboxState.ENDED, EndReason.STOPPED)
    assert set(memory_backend.running) == {second.pk, started.pk}
    # Pressed again, or on the other sandbox's button, after the lesson's sandbox started: nothing more stops.
    assert services.sandbox_replace(sandbox=second, user=None, lesson=three).pk == started.pk
    assert Sandbox.objects.get(pk=second.pk).state == SandboxState.READY


@override_settings(SANDBOX_PER_NETWORK=1)
def test_a_replacement_still_refused_keeps_the_sandbox_it_would_have_stopped(
    memory_backend: type[MemoryBackend], lesson: Lesson, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    two = Lesson.objects.create(slug="two", title="Two", body="text")
    mine = services.sandbox_start(owner_key="anon-a", user=None, lesson=lesson, client_address="198.51.100.1")
    services.sandbox_start(owner_key="anon-b", user=None, lesson=lesson, client_address="203.0.113.7")
    with (
        django_capture_on_commit_callbacks(execute=False) as callbacks,
        pytest.raises(services.TooManySandboxes, match="your network") as refused,
    ):
        services.sandbox_replace(sandbox=mine, user=None, lesson=two, client_address="203.0.113.7")
    assert refused.value.stoppable == []
    assert callbacks == []
    assert Sandbox.objects.get(pk=mine.pk).state == SandboxState.QUEUED
    assert not Sandbox.objects.filter(lesson=two).exists()


@pytest.mark.django_db(transaction=True)
def test_starts_at_once_cannot_pass_the_caps_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two browsers of one owner (or one network) starting at the same moment: the check and the insert are
    one step, so only as many as the cap allows are made, and the others are told why rather than failing."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    from sandbox import tasks

    monkeypatch.setattr(tasks.sandbox_launch_task, "delay", lambda sandbox_id: None)
    lessons = [Lesson.objects.create(slug=f"l{n}", title=f"L{n}", body="text") for n in range(6)]

    def start(lesson: Lesson) -> str:
        try:
            services.sandbox_start(owner_key="anon-same", user=None, lesson=lesson, client_address="192.0.2.9")
            return "started"
        except services.TooManySandboxes:
            return "refused"
        finally:
            connection.close()

    with override_settings(SANDBOX_PER_OWNER=2), ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(start, lessons))
    assert sorted(results) == ["refused"] * 4 + ["started"] * 2
    assert Sandbox.objects.active().filter(owner_key="anon-same").count() == 2
