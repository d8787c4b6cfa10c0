from django.contrib import admin

from .models import Lesson


@admin.register(Lesson)
class LessonAdmin(admin.ModelAdmin):
    list_display = ["position", "title", "slug", "image"]
    list_display_links = ["title"]
    search_fields = ["title", "slug"]
