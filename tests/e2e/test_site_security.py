"""What a lesson's page lets its text do in a real browser, beyond what the lesson commands test covers."""

import pytest
from playwright.sync_api import expect

from lessons.models import Lesson
from tests.e2e.browser import Student

pytestmark = [pytest.mark.browser, pytest.mark.redis]


@pytest.fixture
def lesson(live_asgi: str) -> Lesson:
    # Markdown turns a tab into spaces; written in the block's HTML as a character reference, it stays a tab.
    body = '```sh\necho shown\n```\n\n<pre><code class="language-sh">rm -r ~/D&#9;</code></pre>\n'
    return Lesson.objects.create(slug="tabbed", title="Tabbed", body=body, image="layercake/shell:latest")


def test_run_is_not_offered_for_a_block_whose_tab_would_complete_something_unshown(
    lesson: Lesson, live_asgi: str, student: Student
) -> None:
    # A tab is a key of its own to the shell, not a space: readline completes the word before it, so Run would
    # type more than the block shows (`rm -r ~/D<Tab>` shows as `rm -r ~/D` and removes ~/Documents/).
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    expect(page.get_by_role("button", name="Run this command in the terminal")).to_have_count(1)
    expect(page.locator(".command-bar + pre code")).to_have_text("echo shown")
