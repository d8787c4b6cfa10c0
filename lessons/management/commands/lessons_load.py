from typing import Any

from django.core.management.base import BaseCommand, CommandError

from lessons.services import LessonFileError, lessons_load


class Command(BaseCommand):
    help = "Create or update the built-in lessons from lessons/content/, keeping any edited since loaded."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            report = lessons_load()
        except LessonFileError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"{len(report.lessons)} lessons loaded: {len(report.created)} new, {len(report.updated)} updated, "
            f"{len(report.unchanged)} unchanged, {len(report.kept)} kept as edited"
        )
        for lesson in report.kept:
            changed = " Its file has changed since." if lesson in report.conflicts else ""
            self.stdout.write(
                self.style.WARNING(
                    f"Kept the edits to '{lesson.slug}' made since it was loaded.{changed} "
                    "The lesson admin's action 'Put back as its file has it' drops them."
                )
            )
