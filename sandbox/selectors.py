"""Reads of sandboxes used by more than one place."""

from lessons.models import Lesson

from .models import Sandbox


def sandbox_for_owner(*, owner_key: str | None, lesson: Lesson | None) -> Sandbox | None:
    """The owner's most recent sandbox for the lesson: the live one, else the last that ended."""
    if owner_key is None:
        return None
    return Sandbox.objects.filter(owner_key=owner_key, lesson=lesson).order_by("-created_at").first()


def sandbox_owned(*, owner_key: str | None, sandbox_id: int) -> Sandbox | None:
    if owner_key is None:
        return None
    return Sandbox.objects.filter(pk=sandbox_id, owner_key=owner_key).first()
