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
            self._warn(
                f"Kept the edits to '{lesson.slug}' made since it was loaded.{changed} "
                "The lesson admin's action 'Put back as its file has it' drops them."
            )
        for lesson in report.clashes:
            self._warn(
                f"A lesson made in the admin has the slug '{lesson.slug}' of a built-in lesson, whose file is not "
                "loaded while it does: give one of them another slug."
            )
        for lesson in report.orphaned:
            self._warn(
                f"The built-in lesson '{lesson.slug}' has no file any more; it stays until deleted in the admin."
            )

    def _warn(self, text: str) -> None:
        self.stdout.write(self.style.WARNING(text))
