from django.db import models
from django.urls import reverse

from .validators import validate_concepts, validate_image


class Lesson(models.Model):
    slug = models.SlugField(unique=True)
    title = models.CharField(max_length=200)
    summary = models.CharField(max_length=400, blank=True)
    body = models.TextField(help_text="Markdown.")
    position = models.PositiveIntegerField(default=0)
    image = models.CharField(
        max_length=200,
        blank=True,
        validators=[validate_image],
        help_text="The curated image the sandbox runs; empty for the default.",
    )
    concepts = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_concepts],
        help_text='Curriculum concept ids this lesson teaches, such as ["C1", "C3"].',
    )
    source_digest = models.CharField(
        max_length=64,
        blank=True,
        editable=False,
        help_text="For a built-in lesson, the digest of what was last loaded from its file.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["position", "title"]

    def __str__(self) -> str:
        return self.title

    def get_absolute_url(self) -> str:
        return reverse("lessons:detail", kwargs={"slug": self.slug})
