"""A student in a real browser (Debian's Chromium, driven by Playwright): start a sandbox from a lesson, use
the terminal, lose the page or the network and come back to the same shell."""

import contextlib
import re
import secrets
import socket
import threading
from collections.abc import Iterator

import pytest
from django.test import override_settings
from playwright.sync_api import Page, expect

from lessons.models import Lesson
from tests.e2e.browser import BROWSER_TEST, Student, run, start_sandbox, wait_for_screen

pytestmark = BROWSER_TEST

HELLO, REPLAY = 0x01, 0x82


@pytest.fixture
def lesson(live_asgi: str) -> Lesson:
    # Made before the browser starts: Playwright's sync API runs an event loop in this thread.
    return Lesson.objects.create(
        slug="browser", title="In the browser", body="Try it.", image="layercake/shell:latest"
    )


def shell_cols(page: Page) -> int:
    """What `tput cols` says once it agrees with the browser's terminal (a resize takes a moment to land)."""
    for attempt in range(20):
        cols = int(page.evaluate("() => window.layercakeTerminals[0].term.cols"))
        marker = f"cols{secrets.token_hex(3)}"
        text = run(page, f"echo {marker}=$(tput cols)", rf"^{marker}=\d+$")
        if int(re.findall(rf"^{marker}=(\d+)$", text, re.M)[-1]) == cols:
            return cols
        page.wait_for_timeout(100 * (attempt + 1))
    raise AssertionError("the shell never saw the browser's terminal size")


def test_a_student_starts_uses_and_comes_back_to_a_sandbox(
    live_asgi: str, lesson: Lesson, student: Student
) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")

    # Progress while it launches, then the terminal.
    start_sandbox(page)
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

    # Reload the page: the same shell comes back, its screen restored once.
    page.reload()
    page.wait_for_selector("[data-terminal].is-ready", timeout=30000)
    restored = wait_for_screen(page, r"^answered-2$")
    page.click("[data-screen]")  # a reload leaves focus to the page: the student clicks back in
    assert restored.count("answered-2") == 1, "the screen is restored once, without duplicates"
    assert restored.count("pasted-10\n") == 1
    text = run(page, "echo $MARK-$(wc -l < /tmp/ticks)", r"^kept-\d+$")
    ticks = int(re.findall(r"^kept-(\d+)$", text, re.M)[-1])
    assert ticks > 3, "the loop kept running while no page was open"
    command_line = [line for line in text.splitlines() if "echo $MARK" in line][-1]
    assert command_line.endswith("$ echo $MARK-$(wc -l < /tmp/ticks)"), f"stray input: {command_line!r}"

    # Output far beyond the server's unacknowledged window arrives whole: the page acknowledges as it renders.
    text = run(page, "seq 1 150000; echo seq-done", r"^seq-done$")
    assert text.splitlines()[text.splitlines().index("seq-done") - 1] == "150000"

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
    assert page.evaluate("() => window.layercakeTerminals.length") == 0


class CuttableLink:
    """A TCP relay in front of the site whose connections can be cut and refused, as a lost network would."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.up = True
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        _hang_up(source, sink)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            _hang_up(*self.sockets)
            self.sockets.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _hang_up(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def link(live_asgi: str) -> Iterator[CuttableLink]:
    link = CuttableLink(live_asgi)
    yield link
    link.close()


def test_a_lost_connection_resumes_the_same_screen_without_a_replay(
    lesson: Lesson, student: Student, link: CuttableLink
) -> None:
    page = student.open(f"http://{link.address}{lesson.get_absolute_url()}")
    start_sandbox(page)
    run(page, "COUNTED=yes; echo before-$((1+1))", r"^before-2$")
    page.keyboard.type("for i in $(seq 1 40); do echo line-$i; sleep 0.1; done; echo done-$COUNTED")
    page.keyboard.press("Enter")
    wait_for_screen(page, r"^line-3$")

    link.cut()
    page.wait_for_selector("[data-notice]:has-text('Reconnecting')")
    page.wait_for_timeout(1500)
    link.restore()

    text = wait_for_screen(page, r"^done-yes$", within_ms=20000)
    page.wait_for_selector("[data-notice]", state="hidden")
    lines = text.splitlines()
    for i in range(1, 41):
        assert lines.count(f"line-{i}") == 1, f"line-{i} shows {lines.count(f'line-{i}')} times"
    assert lines.count("before-2") == 1, "the screen was kept, not reset"

    _, *again = student.sockets
    assert again, "the terminal reconnected"
    hello = again[-1]["sent"][0]
    assert hello[0] == HELLO and hello[1] == 1, "the reconnect says it still has its screen"
    assert int.from_bytes(hello[2:10], "big") > 0, "and how much of the output it already shows"
    assert not any(frame[0] == REPLAY for frame in again[-1]["received"]), "nothing was replayed"

    run(page, "echo still-$COUNTED", r"^still-yes$")


def test_when_the_shell_exits_the_page_says_why(live_asgi: str, lesson: Lesson, student: Student) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    start_sandbox(page)
    page.keyboard.type("exit")
    page.keyboard.press("Enter")
    page.wait_for_selector("[data-panel] .notice:has-text('The shell exited.')", timeout=30000)
    assert page.is_visible("button:has-text('Start a fresh sandbox')")
    assert page.evaluate("() => window.layercakeTerminals.length") == 0


def test_a_full_host_says_to_try_again_shortly(live_asgi: str, lesson: Lesson, student: Student) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    with override_settings(SANDBOX_CAPACITY=0):
        page.click("button:has-text('Start sandbox')")
        alert = page.wait_for_selector("[data-panel] [role=alert]")
    assert alert is not None and "Try again in a minute" in alert.inner_text()
    assert page.is_enabled("button:has-text('Start sandbox')")
    assert page.url.endswith(lesson.get_absolute_url()), "the panel changed in place"


IN_TERMINAL_JS = "() => document.activeElement === window.layercakeTerminals[0].term.textarea"
# Where the focused element stands against the terminal: "inside", "before", "after", or "none" for the page.
FOCUS_JS = """() => {
  const focused = document.activeElement;
  const terminal = document.querySelector("[data-terminal]");
  if (!focused || focused === document.body) return "none";
  if (terminal.contains(focused)) return "inside";
  return terminal.compareDocumentPosition(focused) & Node.DOCUMENT_POSITION_PRECEDING ? "before" : "after";
}"""


def in_terminal(page: Page) -> bool:
    return bool(page.evaluate(IN_TERMINAL_JS))


def test_a_keyboard_alone_leaves_the_terminal_and_comes_back(
    live_asgi: str, lesson: Lesson, student: Student
) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    start_sandbox(page)
    assert in_terminal(page), "pressing Start puts the student in the terminal"

    # The way out is on the page, and a screen reader hears it with the terminal's input.
    hint = page.locator("[data-hint]")
    assert hint.is_visible()
    assert "Esc then Tab" in hint.inner_text()
    expect(page.get_by_role("textbox", name="Terminal input")).to_have_accessible_description(
        re.compile("Esc then Tab .* leaves the terminal")
    )

    # Tab alone is the shell's: it completes.
    run(page, "echo completed > /tmp/tab-completion-target; echo written", r"^written$")
    page.keyboard.type("cat /tmp/tab-completion-t")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    wait_for_screen(page, r"^completed$")

    # Escape alone is the shell's: readline reads Escape then . as Meta-., which yanks the last argument.
    run(page, "echo escaped-nine", r"^escaped-nine$")
    page.keyboard.type("echo ")
    page.keyboard.press("Escape")
    page.keyboard.type(".")
    page.keyboard.press("Enter")
    wait_for_screen(page, r"^escaped-nine\n.*\$ echo escaped-nine\nescaped-nine$")
    assert in_terminal(page), "a key after Escape other than Tab keeps the student in the terminal"

    # Escape then Tab moves on to the next control, with a half-typed line left as it was.
    page.keyboard.type("echo par")
    page.keyboard.press("Escape")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Stop sandbox")).to_be_focused()

    # Shift+Tab comes back, and the first key typed then is itself, not swallowed by the Escape.
    page.keyboard.press("Shift+Tab")
    assert in_terminal(page)
    page.keyboard.type("tial-$((2+3))")
    page.keyboard.press("Enter")
    text = wait_for_screen(page, r"^partial-5$")
    assert "\t" not in text and "^I" not in text

    # Escape then Shift+Tab goes back, to the lesson before the terminal.
    page.keyboard.press("Escape")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUS_JS) == "before"
    expect(page.get_by_role("link", name=re.compile("All lessons"))).to_be_focused()
    page.keyboard.press("Tab")
    assert in_terminal(page)
    run(page, "echo back-$((4*4))", r"^back-16$")

    # A reload leaves focus where the page puts it; the terminal is one Tab stop among the others.
    page.reload()
    page.wait_for_selector("[data-terminal].is-ready", timeout=30000)
    wait_for_screen(page, r"^back-16$")
    assert page.evaluate(FOCUS_JS) == "none", "a reload does not move focus into the terminal"
    for _ in range(10):
        page.keyboard.press("Tab")
        if in_terminal(page):
            break
    assert in_terminal(page), "Tab reaches the terminal"
    run(page, "echo reached-$((5*5))", r"^reached-25$")


# The browser's clock an hour slow: what the page counts down comes from the server's seconds, not its times.
SLOW_CLOCK_JS = "(() => { const now = Date.now.bind(Date); Date.now = () => now() - 3600 * 1000; })()"
CLOCK_JS = """(seconds) => new Intl.DateTimeFormat([], { hour: "numeric", minute: "2-digit" })
  .format(Date.now() + seconds * 1000)"""


def seconds_left(countdown: str) -> int:
    shown = re.fullmatch(r"(\d+):(\d\d) left", countdown)
    assert shown, f"the countdown shows {countdown!r}"
    return int(shown.group(1)) * 60 + int(shown.group(2))


@override_settings(SANDBOX_IDLE_TIMEOUT=40, SANDBOX_IDLE_WARNING_LEAD=34)
def test_a_quiet_sandbox_warns_before_it_stops_and_a_key_withdraws_the_warning(
    live_asgi: str, lesson: Lesson, student: Student
) -> None:
    student.context.add_init_script(SLOW_CLOCK_JS)
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    start_sandbox(page)

    # Six seconds without input: the panel says so, politely, and the student stays where they were.
    warning = page.get_by_role("status").filter(has_text="no input for a while")
    expect(warning).to_be_visible(timeout=20000)
    expect(warning).to_have_attribute("aria-live", "polite")
    assert in_terminal(page), "the warning takes no focus from the terminal"
    countdown = page.locator("[data-deadline-countdown]")
    expect(countdown).to_have_attribute("aria-hidden", "true")
    left = seconds_left(countdown.inner_text())
    assert 0 < left <= 34
    # The time it names is on the browser's own clock, however wrong that is.
    assert any(page.evaluate(CLOCK_JS, left + slack) in warning.inner_text() for slack in (-2, 0, 2))
    page.wait_for_timeout(1500)
    assert seconds_left(countdown.inner_text()) < left, "it counts down"

    # A key in the terminal withdraws it at once; quiet again, it comes back with the deadline moved on.
    page.keyboard.press("Space")
    expect(page.locator("[data-deadline-text]")).to_have_text("", timeout=3000)
    expect(countdown).to_have_text("")
    expect(warning).to_be_visible(timeout=15000)
    assert seconds_left(countdown.inner_text()) > 34 - 8
    assert in_terminal(page)


@override_settings(SANDBOX_MAX_AGE=30, SANDBOX_MAX_AGE_WARNING_LEAD=26)
def test_the_maximum_age_is_told_ahead_and_typing_does_not_put_it_off(
    live_asgi: str, lesson: Lesson, student: Student
) -> None:
    page = student.open(f"http://{live_asgi}{lesson.get_absolute_url()}")
    start_sandbox(page)
    warning = page.get_by_role("status").filter(has_text="maximum lifetime")
    expect(warning).to_be_visible(timeout=20000)
    expect(warning).to_contain_text("Everything in it will be gone.")

    run(page, "echo typed-$((3*3))", r"^typed-9$")
    page.wait_for_timeout(1000)
    expect(warning).to_be_visible()

    page.wait_for_selector(
        "[data-panel] .notice:has-text('The sandbox reached its maximum lifetime.')", timeout=30000
    )
    assert page.is_visible("button:has-text('Start a fresh sandbox')")
