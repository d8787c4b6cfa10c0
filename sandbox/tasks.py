"""Celery tasks: each takes ids, re-fetches, and calls one service."""

from celery import shared_task

from . import services


@shared_task(soft_time_limit=90, time_limit=120)
def sandbox_launch_task(sandbox_id: int) -> None:
    services.sandbox_launch(sandbox_id=sandbox_id)


@shared_task(soft_time_limit=60, time_limit=90, acks_late=True)
def sandbox_teardown_task(sandbox_id: int) -> None:
    services.sandbox_teardown(sandbox_id=sandbox_id)


@shared_task(soft_time_limit=120, time_limit=150, acks_late=True)
def sandbox_reap_task() -> None:
    services.sandbox_reap()
