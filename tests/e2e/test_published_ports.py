"""A published port in a real browser: `docker run -p` in the lesson terminal puts a link on the page as soon
as the gateway serves the port (the terminal passes on the gateway's word that the ports changed), the link
opens the student's container, and removing the container takes the link away."""

import pytest
from playwright.sync_api import expect

from lessons.models import Lesson
from tests.e2e.browser import BROWSER_TEST, Student, run, start_sandbox
from tests.gateway_process import GatewayProcess

pytestmark = BROWSER_TEST

COUNT_CHANGES_JS = """() => {
  window.portsChanged = [];
  document.addEventListener("layercake:ports-changed", (event) => window.portsChanged.push(event.detail.ports));
}"""


@pytest.fixture
def lesson(live_asgi: str, gateway_process: GatewayProcess) -> Lesson:
    return Lesson.objects.create(
        slug="ports", title="Ports", body="Publish one.", image="layercake/workstation:latest"
    )


def test_a_published_port_is_linked_once_it_is_served(lesson: Lesson, live_asgi: str, student: Student) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    start_sandbox(page)
    page.evaluate(COUNT_CHANGES_JS)
    link = page.locator("[data-port='8080']")
    expect(link).to_have_count(0)

    command = "sh -c 'echo served-from-web > /index.html; httpd -f -p 80 -h /'"
    run(page, f"docker run -d --name web -p 8080:80 busybox {command}", r"^[0-9a-f]{64}$")
    expect(link).to_have_text("localhost:8080")
    expect(page.locator(".sandbox-ports-target")).to_have_text("→ web:80")
    assert page.evaluate("window.portsChanged") == [[{"port": 8080, "container": "web", "container_port": 80}]]
    # The list is fetched on the word, not on the next poll.
    with page.expect_request(lambda request: request.url.endswith("/ports/"), timeout=2000):
        page.evaluate("() => document.body.dispatchEvent(new CustomEvent('layercake:ports-changed'))")
    with page.expect_popup() as opened:
        link.click()
    expect(opened.value.locator("body")).to_have_text("served-from-web")
    opened.value.close()
    page.locator("[data-screen]").click()

    run(page, "docker rm -f web", r"^web$")
    expect(link).to_have_count(0)
    assert page.evaluate("window.portsChanged")[-1] == []
