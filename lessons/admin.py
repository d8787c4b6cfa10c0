from django import forms
from django.contrib import admin, messages
from django.db.models import BooleanField, Case, QuerySet, Value, When
from django.http import HttpRequest

from .models import Lesson
from .services import LessonFileError, lesson_files, lesson_is_edited, lesson_restore


class LessonForm(forms.ModelForm):
    class Meta:
        model = Lesson
        fields = ["slug", "title", "summary", "body", "position", "image", "concepts"]

    def clean_body(self) -> str:
        # Written as a lesson file's text is read, so that saving a lesson unchanged leaves it as its file
        # has it: a browser sends a textarea's lines ending in CRLF, and the form strips the last newline.
        return str(self.cleaned_data["body"]).replace("\r\n", "\n").strip() + "\n"


@admin.register(Lesson)
class LessonAdmin(admin.ModelAdmin):
    form = LessonForm
    list_display = ["position", "title", "slug", "image", "origin"]
    list_display_links = ["title"]
    search_fields = ["title", "slug"]
    actions = ["put_back"]

    def get_readonly_fields(self, request: HttpRequest, obj: Lesson | None = None) -> list[str]:
        # A built-in lesson is its file's by slug: renamed, the next load would make the file's afresh.
        return ["slug"] if obj is not None and obj.source_digest else []

    def get_queryset(self, request: HttpRequest) -> QuerySet[Lesson]:
        try:
            slugs = list(lesson_files())
        except LessonFileError:
            slugs = []
        has_file = Case(When(slug__in=slugs, then=Value(True)), default=Value(False), output_field=BooleanField())
        return super().get_queryset(request).annotate(has_file=has_file)

    @admin.display(description="Origin")
    def origin(self, lesson: Lesson) -> str:
        if not lesson.source_digest:
            return "made here"
        if not getattr(lesson, "has_file", True):
            return "built-in, its file gone"
        return "built-in, edited" if lesson_is_edited(lesson=lesson) else "built-in"

    @admin.action(description="Put back as its file has it", permissions=["change"])
    def put_back(self, request: HttpRequest, queryset: QuerySet[Lesson]) -> None:
        for lesson in queryset:
            try:
                lesson_restore(lesson=lesson)
            except LessonFileError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"'{lesson.slug}' is as its file has it.", messages.SUCCESS)
