"""A lesson's command blocks in a real browser: Run types one into the lesson terminal, Copy puts it on the
clipboard, and Run before there is a terminal says what to do first."""

import pytest
from playwright.sync_api import expect

from lessons.models import Lesson
from tests.e2e.browser import BROWSER_TEST, Student, start_sandbox, wait_for_screen

pytestmark = BROWSER_TEST

BODY = """Try these.

```sh
echo $((6*7))
echo "two $((1+1))"
```

You will see:

```text
42
```
"""


@pytest.fixture
def lesson(live_asgi: str) -> Lesson:
    return Lesson.objects.create(slug="commands", title="Commands", body=BODY, image="layercake/shell:latest")


def test_run_types_a_block_into_the_terminal_and_copy_copies_it(
    lesson: Lesson, live_asgi: str, student: Student
) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    run = page.get_by_role("button", name="Type these 2 lines into the terminal")
    expect(page.locator(".command-bar")).to_have_count(1)  # the text block shows output: nothing to run

    run.click()
    expect(page.locator(".command-status")).to_have_text("Start the sandbox first, then press Run.")

    start_sandbox(page)
    run.click()
    wait_for_screen(page, r"^42$")
    screen = wait_for_screen(page, r"^two 2$")
    assert screen.count("$((6*7))") == 1, "the block was typed once"
    assert page.evaluate("document.activeElement === window.layercakeTerminals[0].term.textarea")

    page.get_by_role("button", name="Copy these 2 lines").click()
    expect(page.locator(".command-status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == 'echo $((6*7))\necho "two $((1+1))"'
