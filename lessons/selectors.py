from django.db.models import QuerySet

from .models import Lesson


def lesson_list() -> QuerySet[Lesson]:
    return Lesson.objects.order_by("position", "title")
