from typing import Any

from django.core.management.base import BaseCommand, CommandError

from lessons.services import LessonFileError, lessons_load


class Command(BaseCommand):
    help = "Create or update the built-in lessons from lessons/content/."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            lessons = lessons_load()
        except LessonFileError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{len(lessons)} lessons loaded")
