from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.test import override_settings

from sandbox.models import EndReason, Sandbox
from sandbox.selectors import sandbox_deadline_notice, sandbox_deadline_passed

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
pytestmark = pytest.mark.usefixtures("deadline_settings")


@pytest.fixture
def deadline_settings() -> Iterator[None]:
    with override_settings(
        SANDBOX_IDLE_TIMEOUT=900,
        SANDBOX_MAX_AGE=3600,
        SANDBOX_IDLE_WARNING_LEAD=120,
        SANDBOX_MAX_AGE_WARNING_LEAD=300,
    ):
        yield


def sandbox(*, idle_for: float, expires_in: float) -> Sandbox:
    return Sandbox(
        last_activity_at=NOW - timedelta(seconds=idle_for), expires_at=NOW + timedelta(seconds=expires_in)
    )


def test_far_from_either_end_nothing_is_near_until_the_idle_warning() -> None:
    notice = sandbox_deadline_notice(sandbox=sandbox(idle_for=60, expires_in=3000), now=NOW)
    assert notice.near == []
    assert notice.changes_in == 900 - 120 - 60
    assert not notice.input_puts_off


def test_within_the_idle_lead_the_idle_timeout_is_near_and_input_puts_it_off() -> None:
    notice = sandbox_deadline_notice(sandbox=sandbox(idle_for=800, expires_in=3000), now=NOW)
    assert notice.near == [(EndReason.IDLE, 100)]
    assert notice.changes_in == 3000 - 300, "the next change is the maximum age's warning"
    assert notice.input_puts_off


def test_the_idle_warning_begins_exactly_at_its_lead() -> None:
    assert sandbox_deadline_notice(sandbox=sandbox(idle_for=779, expires_in=3000), now=NOW).near == []
    assert sandbox_deadline_notice(sandbox=sandbox(idle_for=780, expires_in=3000), now=NOW).near == [
        (EndReason.IDLE, 120)
    ]


def test_within_the_max_age_lead_the_maximum_age_is_near_and_input_does_not_put_it_off() -> None:
    notice = sandbox_deadline_notice(sandbox=sandbox(idle_for=10, expires_in=240), now=NOW)
    assert notice.near == [(EndReason.MAX_AGE, 240)]
    assert notice.changes_in is None, "the idle timeout would come after the maximum age: never"
    assert not notice.input_puts_off


def test_both_near_come_soonest_first() -> None:
    notice = sandbox_deadline_notice(sandbox=sandbox(idle_for=850, expires_in=200), now=NOW)
    assert notice.near == [(EndReason.IDLE, 50), (EndReason.MAX_AGE, 200)]
    assert notice.changes_in is None
    assert notice.input_puts_off


def test_a_passed_deadline_is_near_with_nothing_left() -> None:
    notice = sandbox_deadline_notice(sandbox=sandbox(idle_for=910, expires_in=1000), now=NOW)
    assert notice.near == [(EndReason.IDLE, 0)]


@override_settings(SANDBOX_IDLE_TIMEOUT=20, SANDBOX_IDLE_WARNING_LEAD=60)
def test_a_lead_longer_than_the_timeout_warns_from_the_start() -> None:
    assert sandbox_deadline_notice(sandbox=sandbox(idle_for=0, expires_in=3000), now=NOW).near == [
        (EndReason.IDLE, 20)
    ]


@pytest.mark.parametrize(
    ("idle_for", "expires_in", "reason"),
    [
        (899, 1, None),
        (900, 1, EndReason.IDLE),
        (10, 0, EndReason.MAX_AGE),
        # Both passed: the maximum age is why it ends.
        (1000, -5, EndReason.MAX_AGE),
    ],
)
def test_the_reaper_ends_a_sandbox_from_the_deadline_on(
    idle_for: float, expires_in: float, reason: EndReason | None
) -> None:
    passed = sandbox_deadline_passed(sandbox=sandbox(idle_for=idle_for, expires_in=expires_in), now=NOW)
    assert (passed.reason if passed else None) == reason


def test_the_warning_ends_where_the_reaper_begins() -> None:
    """What the page counts down to is the moment the reaper takes the sandbox as idle."""
    quiet = sandbox(idle_for=800, expires_in=3000)
    ((_, left),) = sandbox_deadline_notice(sandbox=quiet, now=NOW).near
    assert sandbox_deadline_passed(sandbox=quiet, now=NOW + timedelta(seconds=left - 0.001)) is None
    passed = sandbox_deadline_passed(sandbox=quiet, now=NOW + timedelta(seconds=left))
    assert passed is not None and passed.reason == EndReason.IDLE
