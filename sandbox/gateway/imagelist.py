"""The engine's list of images, shared by every session of the gateway.

Most student commands look an image up among those the engine lists (run, create, tag, rmi, build, images),
and the engine's answer costs it time for every image it holds, every other student's included: on a
workshop's engine, hundreds. So the gateway keeps the last answer while nothing has changed the images. It is
forgotten when a request that changes images begins and again when it ends (and none is kept while one is
under way, but for a build, which names its image only as it ends), and on each engine event that changes
images, whoever caused it; while the engine's event stream
is not followed, nothing is kept and every lookup asks the engine. Nor is a copy kept past MAX_AGE_SECONDS,
should the engine ever drop an event for a subscriber it finds slow.
"""

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from .engine import Engine, EngineError, follow_events

# What changes the engine's list of images: an image's own events, and a commit (a container event, with no
# image event when the new image has no name).
MAX_AGE_SECONDS = 30.0
CHANGES = {"type": ["image", "container"], "event": ["commit", "delete", "import", "load", "pull", "tag", "untag"]}


class ImageList:
    def __init__(self, engine: Engine, *, max_age: float = MAX_AGE_SECONDS) -> None:
        self.engine = engine
        self.max_age = max_age
        self.following = False
        self._body: bytes | None = None
        self._kept_at = 0.0
        self._generation = 0
        self._changing = 0

    def forget(self) -> None:
        self._generation += 1
        self._body = None

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Around a request that may change the engine's images."""
        self._changing += 1
        self.forget()
        try:
            yield
        finally:
            self._changing -= 1
            self.forget()

    async def entries(self) -> list[dict[str, Any]]:
        """The engine's answer to GET /images/json (top-level images), freshly decoded for the caller."""
        body = self._body
        if body is not None and time.monotonic() - self._kept_at > self.max_age:
            body = None
        if body is None:
            generation = self._generation
            asked_at = time.monotonic()
            response = await self.engine.call("GET", "/images/json", query={"all": "0"})
            if response.status >= 400:
                raise EngineError(response.status, response.message)
            body = response.body
            if self.following and not self._changing and generation == self._generation:
                self._body, self._kept_at = body, asked_at
        return json.loads(body) or []

    async def follow(self) -> None:
        """Follow the engine's events for as long as the gateway runs, forgetting the list at each change."""

        def connected() -> None:
            # Whatever changed while the stream was down is caught up with now.
            self.forget()
            self.following = True

        async def changed(line: bytes) -> None:
            self.forget()

        def lost() -> None:
            self.following = False
            self.forget()

        await follow_events(self.engine, CHANGES, connected=connected, event=changed, lost=lost)
