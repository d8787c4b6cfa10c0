"""A student in a real browser (Debian's Chromium, driven by Playwright): start a sandbox from a lesson, use
the terminal, lose the page and come back to the same shell."""

import re
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from lessons.models import Lesson

pytestmark = [
    pytest.mark.browser,
    pytest.mark.engine,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.usefixtures("engine_cleanup"),
]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREEN_JS = """() => {
  const buffer = window.layercakeTerminals[0].term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
  return lines.join("\\n");
}"""


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def screen(page: Page) -> str:
    return str(page.evaluate(SCREEN_JS))


def wait_for_screen(page: Page, pattern: str, *, within_ms: int = 15000) -> str:
    try:
        page.wait_for_function(
            "(pattern) => new RegExp(pattern, 'm').test((" + SCREEN_JS + ")())", arg=pattern, timeout=within_ms
        )
    except PlaywrightTimeout as exc:
        raise AssertionError(f"{pattern!r} never showed; the screen ends with:\n{screen(page)[-1500:]}") from exc
    return screen(page)


def run(page: Page, command: str, expect: str) -> str:
    page.keyboard.type(command)
    page.keyboard.press("Enter")
    return wait_for_screen(page, expect)


@pytest.fixture
def lesson(live_asgi: str) -> Lesson:
    # Made before the browser starts: Playwright's sync API runs an event loop in this thread.
    return Lesson.objects.create(
        slug="browser", title="In the browser", body="Try it.", image="layercake/shell:latest"
    )


def shell_cols(page: Page) -> int:
    """What `tput cols` says once it agrees with the browser's terminal (a resize takes a moment to land)."""
    for _ in range(20):
        cols = int(page.evaluate("() => window.layercakeTerminals[0].term.cols"))
        text = run(page, "clear; tput cols", r"^\d+$")
        if int(re.findall(r"^(\d+)$", text, re.M)[-1]) == cols:
            return cols
        page.wait_for_timeout(100)
    raise AssertionError("the shell never saw the browser's terminal size")


def test_a_student_starts_uses_and_comes_back_to_a_sandbox(
    live_asgi: str, lesson: Lesson, browser: Browser
) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=f"http://{live_asgi}")
    page = context.new_page()
    page.goto(f"http://{live_asgi}{lesson.get_absolute_url()}")
    page.click("button:has-text('Start sandbox')")

    # Progress while it launches, then the terminal.
    page.wait_for_selector("[data-progress] [data-step='queued']")
    page.wait_for_selector(".terminal.is-ready", timeout=60000)
    wait_for_screen(page, r"\$ $")
    run(page, "echo $((6*7))", r"^42$")

    # The terminal's size follows the window, and the shell sees it.
    before = shell_cols(page)
    page.set_viewport_size({"width": 1000, "height": 900})
    page.wait_for_function(f"() => window.layercakeTerminals[0].term.cols < {before}")
    assert shell_cols(page) < before

    # UTF-8 in and out.
    run(page, "echo héllo ✓ 日本", r"^héllo ✓ 日本$")

    # A full-screen program takes the alternate screen and gives it back.
    page.keyboard.type("vi /tmp/note")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.layercakeTerminals[0].term.buffer.active.type === 'alternate'")
    page.keyboard.type("iwritten in vi")
    page.keyboard.press("Escape")
    page.keyboard.type(":wq")
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.layercakeTerminals[0].term.buffer.active.type === 'normal'")
    run(page, "cat /tmp/note", r"^written in vi$")

    # Copy a selection with Ctrl+Shift+C, then paste it back with Ctrl+Shift+V.
    page.evaluate("() => navigator.clipboard.writeText('')")
    page.evaluate("() => window.layercakeTerminals[0].term.selectAll()")
    page.keyboard.press("Control+Shift+C")
    page.wait_for_function("async () => (await navigator.clipboard.readText()).includes('written in vi')")

    page.evaluate("() => navigator.clipboard.writeText('echo pasted-$((5+5))')")
    page.keyboard.press("Control+Shift+V")
    page.keyboard.press("Enter")
    wait_for_screen(page, r"^pasted-10$")

    # A query the shell's program answered once, a variable, and a loop that keeps running without us.
    run(page, "printf '\\033[6n'; read -rs -d R; echo answered-$((1+1))", r"^answered-2$")
    page.keyboard.type(
        "export MARK=kept; (for i in $(seq 1 60); do echo tick-$i >> /tmp/ticks; sleep 0.2; done &)"
    )
    page.keyboard.press("Enter")
    page.wait_for_timeout(600)

    # Close the tab and come back in another.
    page.close()
    page = context.new_page()
    page.goto(f"http://{live_asgi}{lesson.get_absolute_url()}")
    page.wait_for_selector(".terminal.is-ready", timeout=30000)
    restored = wait_for_screen(page, r"^answered-2$")
    assert restored.count("answered-2") == 1, "the screen is restored once, without duplicates"
    assert restored.count("pasted-10\n") == 1
    text = run(page, "echo $MARK-$(wc -l < /tmp/ticks)", r"^kept-\d+$")
    ticks = int(re.findall(r"^kept-(\d+)$", text, re.M)[-1])
    assert ticks > 3, "the loop kept running while no page was open"
    command_line = [line for line in text.splitlines() if "echo $MARK" in line][-1]
    assert command_line.endswith("$ echo $MARK-$(wc -l < /tmp/ticks)"), f"stray input: {command_line!r}"

    # Ctrl-C stops a flood at once, and the tab stays responsive.
    page.keyboard.type("yes")
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    page.keyboard.press("Control+C")
    run(page, "echo after-$((2*5))", r"^after-10$")

    # Stop: the page says why it ended and offers a fresh start.
    page.click("button:has-text('Stop sandbox')")
    page.wait_for_selector("text=You stopped the sandbox.", timeout=30000)
    assert page.is_visible("button:has-text('Start a fresh sandbox')")
    context.close()
