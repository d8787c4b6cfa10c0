"""Every built-in lesson, done as a student does it: a sandbox started as its page starts one, and each
command of its `sh` blocks typed into the lesson terminal, in order, in one shell, through the gateway. A
command fails the test when it fails and the lesson did not mean it to, or when the shell does not come back."""

import asyncio
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.test import Client

from lessons.models import Lesson
from lessons.services import lesson_parse, lessons_load
from sandbox import protocol
from sandbox.tests.test_terminal_live import Terminal, _start, _ws, wait_until_ended
from tests.gateway_process import GatewayProcess

pytestmark = [
    pytest.mark.gateway,
    pytest.mark.engine,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.usefixtures("engine_cleanup"),
]

CONTENT = Path(__file__).resolve().parents[2] / "lessons" / "content"
SH_BLOCK_RE = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)
HEREDOC_RE = re.compile(r"<<-?\s*'?(\w+)'?")
ANSI_RE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# The shell's prompt carries the last command's status; a container's shell and docker's questions have their own.
# A here-document's "> " is not waited for: it is typed whole, and its command ends at the shell's prompt.
SHELL_PROMPT_RE = re.compile(rb"<rc:(\d+)>\$ $")
OTHER_PROMPT_RE = re.compile(rb"(/ # |\[y/N\] )$")

# What a lesson shows failing on purpose: for a command typed more than once, whether each time fails, in order
# (a command not named here, and any time past the last one named, must pass).
MEANT_TO_FAIL: dict[str, dict[str, tuple[bool, ...]]] = {
    "images-and-containers": {"docker run --rm busybox cat /note.txt": (True,)},
    "names-and-registries": {
        "docker push registry.example.com/alice/tools:1.0": (True,),
        "docker run --rm alpine echo hi": (True,),
    },
    "container-lifecycle": {"docker inspect --format '{{.State.Status}}' busybox": (True,)},
    "the-writable-layer": {"docker run --rm busybox cat /notes.txt": (True,), "docker run notebook": (True,)},
    "run-a-service": {"curl localhost:8081": (False, True)},
    "rebuilds-and-cleanup": {
        "docker rmi $(docker images -q --filter dangling=true)": (True, True, False),
        "docker rm $(docker ps -aq)": (True,),
    },
}
# What a lesson asks the student to type a few times over a while, and what it says they will see at last.
RESTARTS = "docker inspect --format '{{.State.Status}} after {{.RestartCount}} restarts' flaky"
REPEATED = {"container-lifecycle": {RESTARTS: "exited after 3 restarts"}}


@dataclass
class Typed:
    line: str
    status: int | None
    output: str


class LessonShell:
    """The lesson terminal, typed into one line at a time, each line waited for until a prompt is back."""

    def __init__(self, term: Terminal) -> None:
        self.term = term

    async def type(self, line: str, *, within: float = 60) -> Typed:
        mark = len(self.term.screen)
        await self.term.ws.send(protocol.input_frame(line.encode() + b"\r"))
        while True:
            await self.term.until(functools.partial(self._prompt_since, mark), within=within)
            tail = ANSI_RE.sub(b"", bytes(self.term.screen[mark:]))
            if not tail.endswith(b"[y/N] "):
                status = SHELL_PROMPT_RE.search(tail)
                return Typed(line, int(status.group(1)) if status else None, tail.decode("utf-8", "replace"))
            # As the lesson says: answer y.
            mark = len(self.term.screen)
            await self.term.ws.send(protocol.input_frame(b"y\r"))

    @staticmethod
    def _prompt_since(mark: int, term: Terminal) -> bool:
        tail = ANSI_RE.sub(b"", bytes(term.screen[max(mark, len(term.screen) - 200) :]))
        return bool(SHELL_PROMPT_RE.search(tail) or OTHER_PROMPT_RE.search(tail))


def commands(body: str) -> list[list[str]]:
    """The lines of each `sh` block, a here-document kept with the command that opens it."""
    result = []
    for block in SH_BLOCK_RE.findall(body):
        lines: list[str] = []
        pending: list[str] = []
        for line in block.splitlines():
            if pending:
                pending.append(line)
                if line.strip() == HEREDOC_RE.search(pending[0]).group(1):  # type: ignore[union-attr]
                    lines.append("\n".join(pending))
                    pending = []
            elif HEREDOC_RE.search(line):
                pending = [line]
            elif line.strip():
                lines.append(line)
        assert not pending, f"an unterminated here-document in {block!r}"
        result.append(lines)
    return result


def _lesson_files() -> list[Path]:
    return sorted(CONTENT.glob("*.md"))


def test_every_lesson_file_is_run() -> None:
    slugs = {lesson_parse(text=path.read_text(), source=path.name).slug for path in _lesson_files()}
    assert set(MEANT_TO_FAIL) | set(REPEATED) <= slugs, "a lesson named here no longer exists"
    assert len(slugs) >= 9


@pytest.mark.parametrize("path", _lesson_files(), ids=lambda path: path.stem)
def test_a_student_can_do_the_lesson(path: Path, live_asgi: str, gateway_process: GatewayProcess) -> None:
    lessons_load()
    slug = lesson_parse(text=path.read_text(), source=path.name).slug
    lesson = Lesson.objects.get(slug=slug)
    blocks = commands(lesson.body)
    assert blocks, "a lesson without commands to type"
    client = Client()
    sandbox = _start(client, lesson)
    failures: list[str] = []
    times: dict[str, int] = {}

    async def session() -> None:
        async with _ws(live_asgi, sandbox.pk, client) as ws:
            term = Terminal(ws)
            await term.hello(cols=160, rows=50)
            await term.until(lambda t: t.state() == "ready", within=90)
            await term.until(lambda t: b"$ " in t.screen, within=30)
            shell = LessonShell(term)
            assert (await shell.type("PS1='<rc:$?>$ '")).status == 0
            for lines in blocks:
                for line in lines:
                    typed = await shell.type(line)
                    awaited = REPEATED.get(slug, {}).get(line)
                    deadline = time.monotonic() + 40
                    while awaited and awaited not in typed.output and time.monotonic() < deadline:
                        await asyncio.sleep(2)
                        typed = await shell.type(line)
                    if awaited and awaited not in typed.output:
                        failures.append(f"{line!r} never showed {awaited!r}:\n{typed.output[-600:]}")
                    times[line] = times.get(line, 0) + 1
                    outcomes = MEANT_TO_FAIL.get(slug, {}).get(line, ())
                    meant = len(outcomes) >= times[line] and outcomes[times[line] - 1]
                    if typed.status is not None and (typed.status != 0) != meant:
                        said = "passed, though the lesson shows it failing" if meant else "failed"
                        failures.append(f"{line!r} {said} ({typed.status}):\n{typed.output[-600:]}")

    try:
        asyncio.run(session())
    finally:
        client.post(f"/sandbox/{sandbox.pk}/stop/", HTTP_HX_REQUEST="true")
        wait_until_ended(sandbox)
    assert not failures, "\n\n".join(failures)
