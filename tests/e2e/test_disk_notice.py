"""The disk budget in a real browser: a container that writes past the sandbox's budget is stopped, the lesson
page says so beside the terminal, and removing it takes the notice away."""

import pytest
from django.test import override_settings
from playwright.sync_api import expect

from lessons.models import Lesson
from tests.e2e.browser import BROWSER_TEST, Student, run, start_sandbox
from tests.gateway_process import GatewayProcess

pytestmark = BROWSER_TEST


@pytest.fixture
def lesson(live_asgi: str, gateway_process: GatewayProcess) -> Lesson:
    return Lesson.objects.create(slug="disk", title="Disk", body="Fill it.", image="layercake/workstation:latest")


@override_settings(SANDBOX_STUDENT_DISK_MB=16)
def test_the_page_says_when_the_sandbox_is_over_its_disk_budget(
    lesson: Lesson, live_asgi: str, student: Student
) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    start_sandbox(page)
    notice = page.locator("[data-disk]")
    expect(notice).to_be_hidden()

    fill = "sh -c 'dd if=/dev/zero of=/fill bs=1M count=24 2>/dev/null; sleep 600'"
    run(page, f"docker run -d --name filler busybox {fill}", r"^[0-9a-f]{64}$")
    expect(notice).to_be_visible(timeout=15000)
    expect(notice).to_contain_text("Your sandbox keeps")
    expect(notice).to_contain_text("more than the 16 MB it may")
    expect(notice).to_contain_text("what was writing was stopped")
    run(page, "docker run --rm busybox true", r"^docker: Error response from daemon: your sandbox keeps")

    run(page, "docker rm filler", r"^filler$")
    expect(notice).to_be_hidden(timeout=15000)
