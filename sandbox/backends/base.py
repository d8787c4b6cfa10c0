"""The contract every sandbox runtime implements.

A backend starts, stops, polls and reaps sandboxes, and opens a terminal on one. What it needs to find a
sandbox again after any restart it returns from `start` as a JSON-able dict, which the caller stores and
hands back; a backend keeps no other state between calls. Docker implements it now; a Kubernetes
implementation plugs in through the SANDBOX_BACKEND setting without touching views or lessons.
"""

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class SandboxError(Exception):
    """Ours: log it, tell the student only that something went wrong."""


class EngineUnavailable(SandboxError):
    """The runtime cannot be reached at all."""


class CapacityExhausted(SandboxError):
    """The host has no room for another sandbox right now."""


class ImageMissing(SandboxError):
    """The sandbox's image is not on the host: the curated images need building."""


class SandboxPhase(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"
    MISSING = "missing"


@dataclass(frozen=True)
class SandboxSpec:
    session_id: int
    owner_key: str
    image: str
    expires_at: int
    memory_mb: int
    cpu_milli: int
    pids_limit: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Poll:
    phase: SandboxPhase
    exit_code: int | None = None


class TerminalStream(Protocol):
    async def read(self) -> bytes | None:
        """The next chunk of output, or None once the shell has gone."""

    async def write(self, data: bytes) -> None: ...

    async def resize(self, *, cols: int, rows: int) -> None: ...

    async def close(self) -> None: ...


ProgressCallback = Callable[[str], None]


class SandboxBackend(abc.ABC):
    @abc.abstractmethod
    def start(self, spec: SandboxSpec, *, progress: ProgressCallback) -> dict[str, Any]:
        """Create and start the sandbox; return the state needed to find it again.

        Calls `progress` with "creating" and then "starting". Raises EngineUnavailable, ImageMissing,
        CapacityExhausted or SandboxError; on failure it leaves nothing behind.
        """

    @abc.abstractmethod
    def stop(self, state: dict[str, Any]) -> None:
        """Remove the sandbox and everything made for it. Idempotent: what is already gone is fine."""

    @abc.abstractmethod
    def poll(self, state: dict[str, Any]) -> Poll: ...

    @abc.abstractmethod
    def reap(self, *, keep: set[int]) -> list[str]:
        """Remove every runtime object of this project whose session is not in `keep`; return what went.

        May be a no-op for runtimes that clean up after themselves.
        """

    @abc.abstractmethod
    async def open_terminal(self, state: dict[str, Any]) -> TerminalStream:
        """Attach to the sandbox's shell, letting it start on the first attach so that nothing it prints
        is lost before anyone listens; on a later attach, the program in front is asked to redraw."""
