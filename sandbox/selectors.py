"""Reads of sandboxes used by more than one place."""

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

from lessons.models import Lesson

from .gateway.config import gateway_config
from .models import EndReason, Sandbox


def sandbox_for_owner(*, owner_key: str | None, lesson: Lesson | None) -> Sandbox | None:
    """The owner's most recent sandbox for the lesson: the live one, else the last that ended."""
    if owner_key is None:
        return None
    return Sandbox.objects.filter(owner_key=owner_key, lesson=lesson).order_by("-created_at").first()


def sandbox_owned(*, owner_key: str | None, sandbox_id: int) -> Sandbox | None:
    if owner_key is None:
        return None
    return Sandbox.objects.filter(pk=sandbox_id, owner_key=owner_key).first()


@dataclass(frozen=True)
class Deadline:
    """A time from which the reaper ends a live sandbox, and when the student is first told of it."""

    reason: EndReason
    at: datetime
    warn_at: datetime


def sandbox_deadlines(*, sandbox: Sandbox) -> list[Deadline]:
    """When the sandbox ends unless something changes: the maximum age, then the idle timeout (its input puts
    that off, see `sandbox_touch`). The reaper ends it at its first run from a deadline on, at most
    SANDBOX_REAP_INTERVAL later; the page warns of it from `warn_at`."""
    idle_at = sandbox.last_activity_at + timedelta(seconds=settings.SANDBOX_IDLE_TIMEOUT)
    return [
        Deadline(
            EndReason.MAX_AGE,
            sandbox.expires_at,
            sandbox.expires_at - timedelta(seconds=settings.SANDBOX_MAX_AGE_WARNING_LEAD),
        ),
        Deadline(EndReason.IDLE, idle_at, idle_at - timedelta(seconds=settings.SANDBOX_IDLE_WARNING_LEAD)),
    ]


def sandbox_deadline_passed(*, sandbox: Sandbox, now: datetime) -> Deadline | None:
    """The deadline for which the reaper ends the sandbox at `now`, if any: the maximum age when both passed."""
    return next((deadline for deadline in sandbox_deadlines(sandbox=sandbox) if deadline.at <= now), None)


@dataclass(frozen=True)
class DeadlineNotice:
    """What the page says at a moment: the deadlines it warns of, soonest first, with the seconds left to each,
    and in how many seconds that changes if nothing else does (None: only input or the end changes it)."""

    near: list[tuple[EndReason, float]]
    changes_in: float | None

    @property
    def input_puts_off(self) -> bool:
        return any(reason == EndReason.IDLE for reason, _ in self.near)


def sandbox_deadline_notice(*, sandbox: Sandbox, now: datetime) -> DeadlineNotice:
    # The sandbox is gone at its maximum age: an idle timeout after that never comes.
    coming = [deadline for deadline in sandbox_deadlines(sandbox=sandbox) if deadline.at <= sandbox.expires_at]
    near = sorted((deadline for deadline in coming if deadline.warn_at <= now), key=lambda deadline: deadline.at)
    later = [deadline.warn_at for deadline in coming if deadline.warn_at > now]
    return DeadlineNotice(
        near=[(deadline.reason, max(0.0, (deadline.at - now).total_seconds())) for deadline in near],
        changes_in=(min(later) - now).total_seconds() if later else None,
    )


async def sandbox_events(*, sandbox_id: int) -> AsyncGenerator[dict[str, Any], None]:
    """What the student does in the sandbox from now on, as the gateway publishes it (sandbox/gateway/events.py),
    each event a dict with its "type". Raises redis.RedisError when Redis fails."""
    client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, health_check_interval=30)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(gateway_config().events_channel(sandbox_id))
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            try:
                event = json.loads(message["data"])
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("type"), str):
                yield event
    finally:
        # A websocket closing while this ends does not cut the connection's end short.
        await asyncio.shield(_close_pubsub(pubsub, client))


async def _close_pubsub(pubsub: Any, client: aioredis.Redis) -> None:
    await pubsub.aclose()
    await client.aclose()
