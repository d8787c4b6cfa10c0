"""Everything that changes a sandbox's state. Views, tasks and consumers call these and nothing else."""

import ipaddress
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.utils import timezone

from lessons.models import Lesson

from .backends import get_backend
from .backends.base import (
    CapacityExhausted,
    EngineUnavailable,
    ImageMissing,
    SandboxError,
    SandboxPhase,
    SandboxSpec,
)
from .models import ACTIVE_STATES, EndReason, Sandbox, SandboxState
from .selectors import sandbox_deadline_passed

log = logging.getLogger(__name__)


class SandboxFull(Exception):
    """The host is at capacity: the student should try again shortly."""


class TooManySandboxes(Exception):
    """The owner, or their network, already has as many live sandboxes as it may: one should be stopped.

    `stoppable` holds the owner's own live sandboxes whose stopping would make room, for the refusal to offer;
    never anyone else's."""

    def __init__(self, message: str, *, stoppable: list[Sandbox]) -> None:
        super().__init__(message)
        self.stoppable = stoppable


def sandbox_group(sandbox_id: int) -> str:
    return f"sandbox.{sandbox_id}"


def _group_send(sandbox_id: int, event: dict[str, str]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(sandbox_group(sandbox_id), event)
    except Exception:
        log.warning("could not tell the terminals of sandbox %s of %s", sandbox_id, event["type"], exc_info=True)


def sandbox_publish(*, sandbox: Sandbox) -> None:
    """Tell every terminal watching this sandbox about its state."""
    event = {
        "type": "sandbox.status",
        "state": sandbox.state,
        "reason": sandbox.end_reason,
        "message": sandbox_message(sandbox=sandbox),
    }
    _group_send(sandbox.pk, event)


def sandbox_message(*, sandbox: Sandbox) -> str:
    if sandbox.message:
        return sandbox.message
    return sandbox.get_end_reason_display() if sandbox.end_reason else ""


def _image_for(lesson: Lesson | None) -> str:
    return (lesson.image if lesson and lesson.image else "") or settings.SANDBOX_IMAGE


def client_network(address: str) -> str:
    """The network a client's address stands for: the address itself for IPv4, its /64 for IPv6 (one
    machine commonly holds a whole /64). Empty for no address."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def sandbox_start(
    *,
    owner_key: str,
    user: AbstractBaseUser | AnonymousUser | None,
    lesson: Lesson | None,
    client_address: str = "",
) -> Sandbox:
    """The owner's live sandbox for this lesson, or a new one queued for launch.

    An owner may have SANDBOX_PER_OWNER live sandboxes, and the clients of one network SANDBOX_PER_NETWORK
    together: an owner is only a browser session, which a script can throw away and get anew."""
    network = client_network(client_address)
    with transaction.atomic():
        existing = Sandbox.objects.active().filter(owner_key=owner_key, lesson=lesson).first()
        if existing is not None:
            return existing
        others = list(Sandbox.objects.active().filter(owner_key=owner_key).select_related("lesson"))
        if len(others) >= settings.SANDBOX_PER_OWNER:
            raise TooManySandboxes(
                f"You already have {len(others)} sandboxes running, as many as you may have at once. "
                "Stop one to start one here.",
                stoppable=others,
            )
        if (
            network
            and Sandbox.objects.active().filter(client_network=network).count() >= settings.SANDBOX_PER_NETWORK
        ):
            # Only a sandbox of the same network frees a place on it.
            mine_here = [sandbox for sandbox in others if sandbox.client_network == network]
            raise TooManySandboxes(
                "Every sandbox your network may have at once is in use. Try again when someone there stops one"
                + (", or stop one of yours to start one here." if mine_here else "."),
                stoppable=mine_here,
            )
        if Sandbox.objects.active().count() >= settings.SANDBOX_CAPACITY:
            raise SandboxFull("Every sandbox on this host is in use. Try again in a minute.")
        now = timezone.now()
        sandbox = Sandbox.objects.create(
            owner_key=owner_key,
            user_id=user.pk if user is not None and user.is_authenticated else None,
            lesson=lesson,
            client_network=network,
            image=_image_for(lesson),
            state=SandboxState.QUEUED,
            last_activity_at=now,
            expires_at=now + timedelta(seconds=settings.SANDBOX_MAX_AGE),
        )
        from .tasks import sandbox_launch_task

        sandbox_id = sandbox.pk
        transaction.on_commit(lambda: sandbox_launch_task.delay(sandbox_id))
    return sandbox


class LaunchCancelled(Exception):
    """The sandbox was stopped while it was being launched."""


def _advance(sandbox: Sandbox, state: SandboxState, **fields: object) -> bool:
    """Move a sandbox that is still live to `state`; False if it was stopped meanwhile."""
    updated = Sandbox.objects.filter(pk=sandbox.pk, state__in=ACTIVE_STATES).update(state=state, **fields)
    if not updated:
        return False
    sandbox.state = state
    for name, value in fields.items():
        setattr(sandbox, name, value)
    sandbox_publish(sandbox=sandbox)
    return True


def sandbox_launch(*, sandbox_id: int) -> None:
    """Create and start the sandbox's container, moving it through creating and starting to ready.

    A sandbox stopped during its launch is not revived: what the launch made is removed again.
    """
    sandbox = Sandbox.objects.get(pk=sandbox_id)
    if sandbox.state != SandboxState.QUEUED:
        return
    spec = SandboxSpec(
        session_id=sandbox.pk,
        owner_key=sandbox.owner_key,
        image=sandbox.image,
        expires_at=int(sandbox.expires_at.timestamp()),
        memory_mb=settings.SANDBOX_MEMORY_MB,
        cpu_milli=settings.SANDBOX_CPU_MILLI,
        pids_limit=settings.SANDBOX_PIDS_LIMIT,
    )

    def progress(step: str) -> None:
        if not _advance(sandbox, SandboxState(step)):
            raise LaunchCancelled

    backend = get_backend()
    try:
        state = backend.start(spec, progress=progress)
    except LaunchCancelled:
        return
    except EngineUnavailable:
        log.exception("engine unreachable while starting sandbox %s", sandbox_id)
        _fail(sandbox, reason=EndReason.ENGINE_DOWN)
        return
    except CapacityExhausted:
        _fail(sandbox, reason=EndReason.ERROR, message="The host is full right now. Try again shortly.")
        return
    except ImageMissing:
        log.exception("sandbox %s has no image", sandbox_id)
        _fail(sandbox, reason=EndReason.ERROR, message="This lesson's image is not installed on the host yet.")
        return
    except SandboxError:
        log.exception("sandbox %s failed to start", sandbox_id)
        _fail(sandbox, reason=EndReason.ERROR)
        return
    if not _advance(sandbox, SandboxState.READY, backend_state=state, ready_at=timezone.now()):
        backend.stop(state)


def _fail(sandbox: Sandbox, *, reason: EndReason, message: str = "") -> None:
    _advance(sandbox, SandboxState.FAILED, end_reason=reason, message=message, ended_at=timezone.now())


def _end(sandbox: Sandbox, *, reason: EndReason, message: str = "") -> None:
    sandbox.state = SandboxState.ENDED
    sandbox.end_reason = reason
    sandbox.message = message
    sandbox.ended_at = timezone.now()
    sandbox.save(update_fields=["state", "end_reason", "message", "ended_at"])
    sandbox_publish(sandbox=sandbox)


def _mark_stopping(sandbox: Sandbox, *, reason: EndReason) -> bool:
    """Within the caller's transaction: mark a live sandbox stopping and remove it once that commits."""
    updated = Sandbox.objects.filter(pk=sandbox.pk, state__in=ACTIVE_STATES).update(
        state=SandboxState.STOPPING, end_reason=reason
    )
    if updated:
        from .tasks import sandbox_teardown_task

        sandbox_id = sandbox.pk
        transaction.on_commit(lambda: sandbox_teardown_task.delay(sandbox_id))
    return bool(updated)


def sandbox_stop(*, sandbox: Sandbox, reason: EndReason) -> Sandbox:
    """End a sandbox now for `reason`; its container is removed in the background."""
    with transaction.atomic():
        stopped = _mark_stopping(sandbox, reason=reason)
    sandbox.refresh_from_db()
    if stopped:
        sandbox_publish(sandbox=sandbox)
    return sandbox


def sandbox_replace(
    *,
    sandbox: Sandbox,
    user: AbstractBaseUser | AnonymousUser | None,
    lesson: Lesson,
    client_address: str = "",
) -> Sandbox:
    """Stop one of an owner's sandboxes and start theirs for `lesson` in its place: both or neither, so a start
    that is still refused (the host or the network full) leaves the sandbox it would have replaced running, and
    one already live for `lesson` (another button pressed first) stops nothing."""
    with transaction.atomic():
        already = Sandbox.objects.active().filter(owner_key=sandbox.owner_key, lesson=lesson).exists()
        stopped = not already and _mark_stopping(sandbox, reason=EndReason.STOPPED)
        started = sandbox_start(
            owner_key=sandbox.owner_key, user=user, lesson=lesson, client_address=client_address
        )
    sandbox.refresh_from_db()
    if stopped:
        sandbox_publish(sandbox=sandbox)
    return started


def sandbox_teardown(*, sandbox_id: int) -> None:
    """Remove what the backend made for the sandbox and mark it ended. Safe to repeat."""
    sandbox = Sandbox.objects.get(pk=sandbox_id)
    if sandbox.backend_state:
        get_backend().stop(sandbox.backend_state)
    if sandbox.state in (SandboxState.ENDED, SandboxState.FAILED):
        return
    reason = EndReason(sandbox.end_reason) if sandbox.end_reason else EndReason.STOPPED
    _end(sandbox, reason=reason, message=sandbox.message)


def sandbox_touch(*, sandbox_id: int) -> bool:
    """Record that the student used the sandbox, which puts off its idle timeout; whether it is still live.
    The terminal consumer then tells the sandbox's other terminals, from where waiting on the channel layer
    holds up no one (another tab's may be warning of the timeout)."""
    return bool(
        Sandbox.objects.filter(pk=sandbox_id, state__in=ACTIVE_STATES).update(last_activity_at=timezone.now())
    )


def sandbox_shell_gone(*, sandbox_id: int) -> None:
    """The terminal lost the shell: find out why and end the sandbox accordingly."""
    sandbox = Sandbox.objects.get(pk=sandbox_id)
    if sandbox.state != SandboxState.READY:
        return
    poll = get_backend().poll(sandbox.backend_state)
    if poll.phase == SandboxPhase.RUNNING:
        return
    expired = timezone.now() >= sandbox.expires_at - timedelta(seconds=2)
    sandbox_stop(sandbox=sandbox, reason=EndReason.MAX_AGE if expired else EndReason.EXITED)


def sandbox_end_all(*, reason: EndReason) -> list[int]:
    """End every sandbox that is live or stopping, now, removing what the backend made for it."""
    ended = []
    for sandbox in Sandbox.objects.filter(state__in=[*ACTIVE_STATES, SandboxState.STOPPING]):
        Sandbox.objects.filter(pk=sandbox.pk, state__in=ACTIVE_STATES).update(
            state=SandboxState.STOPPING, end_reason=reason
        )
        sandbox_teardown(sandbox_id=sandbox.pk)
        ended.append(sandbox.pk)
    return ended


@dataclass
class ReapReport:
    idle: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)
    vanished: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def sandbox_reap() -> ReapReport:
    """Reconcile the database with the runtime: end idle, expired, stuck and vanished sandboxes, and remove
    runtime objects that belong to no live sandbox. Idempotent."""
    report = ReapReport()
    now = timezone.now()
    stuck_before = now - timedelta(seconds=settings.SANDBOX_START_TIMEOUT)
    backend = get_backend()
    ended = {EndReason.MAX_AGE: report.expired, EndReason.IDLE: report.idle}
    for sandbox in Sandbox.objects.active():
        # The same deadlines the lesson page warns of.
        deadline = sandbox_deadline_passed(sandbox=sandbox, now=now)
        if deadline is not None:
            sandbox_stop(sandbox=sandbox, reason=deadline.reason)
            ended[deadline.reason].append(sandbox.pk)
        elif sandbox.state != SandboxState.READY and sandbox.created_at <= stuck_before:
            sandbox_stop(sandbox=sandbox, reason=EndReason.ERROR)
            report.stuck.append(sandbox.pk)
        elif (
            sandbox.state == SandboxState.READY
            and backend.poll(sandbox.backend_state).phase != SandboxPhase.RUNNING
        ):
            sandbox_stop(sandbox=sandbox, reason=EndReason.VANISHED)
            report.vanished.append(sandbox.pk)
    for sandbox in Sandbox.objects.filter(state=SandboxState.STOPPING):
        sandbox_teardown(sandbox_id=sandbox.pk)
    # Sandboxes still stopping keep their objects until their teardown task has run.
    keep = set(
        Sandbox.objects.filter(state__in=[*ACTIVE_STATES, SandboxState.STOPPING]).values_list("pk", flat=True)
    )
    report.removed = backend.reap(keep=keep)
    return report
