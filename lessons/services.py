"""Lessons: loading the built-in ones from their files, and rendering their text."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import markdown
import yaml
from django.db import transaction
from django.utils.safestring import SafeString, mark_safe

from .models import Lesson

CONTENT_DIR = Path(__file__).resolve().parent / "content"
FRONT_MATTER_FIELDS = {"slug", "title", "summary", "position", "image", "concepts"}


class LessonFileError(ValueError):
    """A lesson file that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LessonFile:
    slug: str
    title: str
    summary: str
    position: int
    image: str
    concepts: list[str]
    body: str


def lesson_parse(*, text: str, source: str) -> LessonFile:
    if not text.startswith("---\n"):
        raise LessonFileError(f"{source}: a lesson starts with a '---' line and YAML front matter")
    try:
        head, body = text[4:].split("\n---\n", 1)
    except ValueError as exc:
        raise LessonFileError(f"{source}: the front matter has no closing '---' line") from exc
    try:
        meta: Any = yaml.safe_load(head)
    except yaml.YAMLError as exc:
        raise LessonFileError(f"{source}: the front matter is not valid YAML: {exc}") from exc
    if not isinstance(meta, dict):
        raise LessonFileError(f"{source}: the front matter must be a mapping")
    unknown = set(meta) - FRONT_MATTER_FIELDS
    if unknown:
        raise LessonFileError(f"{source}: unknown front matter fields: {', '.join(sorted(unknown))}")
    for required in ("slug", "title"):
        if not isinstance(meta.get(required), str) or not meta[required].strip():
            raise LessonFileError(f"{source}: '{required}' is required")
    concepts = meta.get("concepts") or []
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        raise LessonFileError(f"{source}: 'concepts' must be a list of concept ids")
    position = meta.get("position", 0)
    if not isinstance(position, int):
        raise LessonFileError(f"{source}: 'position' must be a whole number")
    return LessonFile(
        slug=meta["slug"].strip(),
        title=meta["title"].strip(),
        summary=str(meta.get("summary") or "").strip(),
        position=position,
        image=str(meta.get("image") or ""),
        concepts=concepts,
        body=body.strip() + "\n",
    )


def lessons_load(*, directory: Path = CONTENT_DIR) -> list[Lesson]:
    """Create or update a lesson for every file in `directory`. All files are checked before any is saved."""
    parsed = [
        lesson_parse(text=path.read_text(encoding="utf-8"), source=path.name)
        for path in sorted(directory.glob("*.md"))
    ]
    slugs = [item.slug for item in parsed]
    duplicates = {slug for slug in slugs if slugs.count(slug) > 1}
    if duplicates:
        raise LessonFileError(f"two lesson files share the slug {', '.join(sorted(duplicates))}")
    lessons = []
    with transaction.atomic():
        for item in parsed:
            lesson, _ = Lesson.objects.update_or_create(
                slug=item.slug,
                defaults={
                    "title": item.title,
                    "summary": item.summary,
                    "position": item.position,
                    "image": item.image,
                    "concepts": item.concepts,
                    "body": item.body,
                },
            )
            lessons.append(lesson)
    return lessons


def lesson_render(*, lesson: Lesson) -> SafeString:
    html = markdown.markdown(lesson.body, extensions=["fenced_code", "tables", "sane_lists"])
    return mark_safe(html)
