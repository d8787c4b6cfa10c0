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

<pre><code class="language-sh">ls<details><summary></summary>; echo hidden</details></code></pre>

<pre><code class="language-sh">echo hidden&#27;[2K&#27;[Gls</code></pre>

<pre><code class="language-sh">echo &#x202e;olleh</code></pre>

<pre><code class="language-sh">r&#x200b;m -r ~/Documents</code></pre>
"""


@pytest.fixture
def lesson(live_asgi: str) -> Lesson:
    return Lesson.objects.create(slug="commands", title="Commands", body=BODY, image="layercake/shell:latest")


def test_run_types_a_block_into_the_terminal_copy_copies_it_and_run_says_what_stops_it(
    lesson: Lesson, live_asgi: str, student: Student
) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    run = page.get_by_role("button", name="Run these 2 lines in the terminal")
    # A text block shows output, and Run types only what a block shows: one with markup in it or characters that
    # are not shown as typed (an escape sequence, a reordering mark, a zero-width space) gets no buttons.
    expect(page.locator(".command-bar")).to_have_count(1)

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

    # Another tab takes the terminal over: Run here says how to take it back, and then types again.
    other = student.open(page.url)
    other.wait_for_selector("[data-terminal].is-ready")
    expect(page.get_by_role("button", name="Use it here")).to_be_visible()
    run.click()
    expect(page.locator(".command-status")).to_have_text(
        "The terminal is open in another tab: press \u201cUse it here\u201d first."
    )
    other.close()
    page.get_by_role("button", name="Use it here").click()
    page.wait_for_function("() => window.layercakeTerminals.length === 1")
    expect(page.locator("[data-notice]")).to_be_hidden()
    run.click()
    wait_for_screen(page, r"^two 2$(?:.|\n)*^two 2$")
