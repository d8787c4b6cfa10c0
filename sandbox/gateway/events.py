"""What a student did, published for the rest of the site.

Each event is one JSON object on the Redis pubsub channel `<namespace>:events:<session_id>`
(`layercake:events:<session_id>` on the site), with "type", "at" (unix seconds, float) and:

    container.created   id, name, image
    container.started   id, name, image
    container.stopped   id, name, image, exit_code
    container.removed   id, name, image
    container.paused / container.unpaused   id, name, image
    image.built         id, tags (list of the student's names, e.g. ["myapp:latest"])
    image.committed     id, container (student's name), tags
    image.tagged        id, tag (e.g. "myapp:v2"), source (what the student named)
    image.removed       ref (what the student named), untagged (list), deleted (list of ids)
    ports.changed       ports (list of {"port", "container", "container_port"}, by port: `localhost:<port>`
                        in the student's shell is `<container>:<container_port>`; empty when none is)
    disk.full           used, budget (bytes), message (what the sandbox keeps, and what was stopped): the
                        sandbox went over its disk budget, or a container writing past it is being stopped
    disk.freed          used, budget, message (empty): the sandbox is within its disk budget again

Container events come from the engine's own event stream, so a container removed by --rm or stopped by
its process exiting is reported too; image events come from the gateway's handlers; ports.changed once the
gateway serves the ports it names.
"""

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, *, redis: aioredis.Redis, channel: Callable[[int], str]) -> None:
        self.redis = redis
        self.channel = channel

    async def publish(self, session_id: int, kind: str, **fields: Any) -> None:
        payload = {"type": kind, **fields, "at": time.time()}
        try:
            await self.redis.publish(self.channel(session_id), json.dumps(payload))
        except Exception:
            log.warning("could not publish %s for session %s", kind, session_id, exc_info=True)
