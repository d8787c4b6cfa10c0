"""A backend that keeps sandboxes in memory, for unit tests of services and views only."""

from typing import Any

from sandbox.backends.base import Poll, ProgressCallback, SandboxBackend, SandboxPhase, SandboxSpec, TerminalStream


class MemoryBackend(SandboxBackend):
    running: dict[int, SandboxSpec] = {}
    fail_with: Exception | None = None

    def start(self, spec: SandboxSpec, *, progress: ProgressCallback) -> dict[str, Any]:
        progress("creating")
        if self.fail_with is not None:
            raise self.fail_with
        progress("starting")
        self.running[spec.session_id] = spec
        return {"session": spec.session_id}

    def stop(self, state: dict[str, Any]) -> None:
        self.running.pop(state["session"], None)

    def poll(self, state: dict[str, Any]) -> Poll:
        return Poll(SandboxPhase.RUNNING if state["session"] in self.running else SandboxPhase.MISSING)

    def reap(self, *, keep: set[int]) -> list[str]:
        gone = [f"sandbox {key}" for key in self.running if key not in keep]
        for key in list(self.running):
            if key not in keep:
                del self.running[key]
        return gone

    async def open_terminal(self, state: dict[str, Any]) -> TerminalStream:
        raise NotImplementedError
