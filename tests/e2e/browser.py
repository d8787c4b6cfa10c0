"""What the browser tests share: a student's browser context that records what its pages threw and the frames
their terminals exchanged, and ways to read and type at the lesson terminal."""

import shutil

import pytest
from playwright.sync_api import BrowserContext, Page, WebSocket
from playwright.sync_api import TimeoutError as PlaywrightTimeout

# A browser test drives a real sandbox through the site.
BROWSER_TEST = [
    pytest.mark.browser,
    pytest.mark.engine,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.usefixtures("engine_cleanup"),
]
CHROMIUM = shutil.which("chromium")
SCREEN_JS = """() => {
  const buffer = window.layercakeTerminals[0].term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
  return lines.join("\\n");
}"""


class Student:
    """A browser context with what the test needs to see of it: errors thrown on its pages and the frames
    its terminals exchanged, per websocket."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.errors: list[str] = []
        self.sockets: list[dict[str, list[bytes]]] = []
        context.on("page", self._watch)

    def _watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("websocket", self._record)

    def _record(self, ws: WebSocket) -> None:
        frames: dict[str, list[bytes]] = {"sent": [], "received": []}
        self.sockets.append(frames)
        ws.on("framesent", lambda payload: frames["sent"].append(as_bytes(payload)))
        ws.on("framereceived", lambda payload: frames["received"].append(as_bytes(payload)))

    def open(self, url: str) -> Page:
        page = self.context.new_page()
        page.goto(url)
        return page


def as_bytes(payload: str | bytes) -> bytes:
    return payload if isinstance(payload, bytes) else payload.encode()


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


def start_sandbox(page: Page) -> None:
    page.click("button:has-text('Start sandbox')")
    page.wait_for_selector("[data-progress] [data-step='queued']")
    page.wait_for_selector("[data-terminal].is-ready", timeout=60000)
    wait_for_screen(page, r"\$ $")
