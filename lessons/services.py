"""Lessons: loading the built-in ones from their files, and rendering their text."""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import markdown
import nh3
import yaml
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.safestring import SafeString, mark_safe

from .models import Lesson

CONTENT_DIR = Path(__file__).resolve().parent / "content"
LANGUAGE_CLASS_RE = re.compile(r"language-[\w-]+")
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
    if not isinstance(position, int) or isinstance(position, bool):
        raise LessonFileError(f"{source}: 'position' must be a whole number")
    parsed = LessonFile(
        slug=meta["slug"].strip(),
        title=meta["title"].strip(),
        summary=str(meta.get("summary") or "").strip(),
        position=position,
        image=str(meta.get("image") or ""),
        concepts=concepts,
        body=body.strip() + "\n",
    )
    try:
        Lesson(slug=parsed.slug, **_fields(parsed)).full_clean(validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        problems = "; ".join(f"'{name}': {' '.join(errors)}" for name, errors in exc.message_dict.items())
        raise LessonFileError(f"{source}: {problems}") from exc
    return parsed


LOADED_FIELDS = ("title", "summary", "position", "image", "concepts", "body")


@dataclass
class LessonLoad:
    """What loading the built-in lessons did. `kept` were edited since they were last loaded (in the admin,
    say) and keep those edits; of them, `conflicts` also have a file that changed since. `clashes` were made
    in the admin under the slug of a file, which is not loaded; `orphaned` were loaded from a file that is
    gone, and stay as they are."""

    created: list[Lesson] = field(default_factory=list)
    updated: list[Lesson] = field(default_factory=list)
    unchanged: list[Lesson] = field(default_factory=list)
    kept: list[Lesson] = field(default_factory=list)
    conflicts: list[Lesson] = field(default_factory=list)
    clashes: list[Lesson] = field(default_factory=list)
    orphaned: list[Lesson] = field(default_factory=list)

    @property
    def lessons(self) -> list[Lesson]:
        return self.created + self.updated + self.unchanged + self.kept


def _fields(item: LessonFile | Lesson) -> dict[str, Any]:
    return {name: getattr(item, name) for name in LOADED_FIELDS}


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def lesson_is_edited(*, lesson: Lesson) -> bool:
    """Whether a built-in lesson differs from what was last loaded from its file. A lesson made in the
    admin has no file and counts as edited."""
    return lesson.source_digest != _digest(_fields(lesson))


def lesson_files(*, directory: Path | None = None) -> dict[str, LessonFile]:
    """Every lesson file in `directory` (the built-in lessons' by default) by slug, all of them checked; the
    first bad one raises."""
    directory = directory or CONTENT_DIR
    parsed = [
        lesson_parse(text=path.read_text(encoding="utf-8"), source=path.name)
        for path in sorted(directory.glob("*.md"))
    ]
    slugs = [item.slug for item in parsed]
    duplicates = {slug for slug in slugs if slugs.count(slug) > 1}
    if duplicates:
        raise LessonFileError(f"two lesson files share the slug {', '.join(sorted(duplicates))}")
    return {item.slug: item for item in parsed}


def _apply(lesson: Lesson, item: LessonFile) -> None:
    fields = _fields(item)
    for name, value in fields.items():
        setattr(lesson, name, value)
    lesson.source_digest = _digest(fields)
    lesson.save()


def lessons_load(*, directory: Path | None = None) -> LessonLoad:
    """Create or update a lesson for every file in `directory`, keeping any lesson edited since it was last
    loaded. All files are checked before any is saved."""
    files = lesson_files(directory=directory)
    report = LessonLoad()
    with transaction.atomic():
        existing = {lesson.slug: lesson for lesson in Lesson.objects.select_for_update().filter(slug__in=files)}
        for slug, item in files.items():
            lesson = existing.get(slug)
            if lesson is None:
                lesson = Lesson(slug=slug)
                _apply(lesson, item)
                report.created.append(lesson)
            elif not lesson.source_digest:
                report.clashes.append(lesson)
            elif lesson_is_edited(lesson=lesson):
                report.kept.append(lesson)
                if lesson.source_digest != _digest(_fields(item)):
                    report.conflicts.append(lesson)
            elif _fields(lesson) != _fields(item):
                _apply(lesson, item)
                report.updated.append(lesson)
            else:
                report.unchanged.append(lesson)
        report.orphaned = list(Lesson.objects.exclude(source_digest="").exclude(slug__in=files))
    return report


def lesson_restore(*, lesson: Lesson, directory: Path | None = None) -> None:
    """Put a built-in lesson back as its file has it, dropping edits made since it was loaded."""
    item = lesson_files(directory=directory).get(lesson.slug)
    if item is None and lesson.source_digest:
        raise LessonFileError(f"the file of the lesson {lesson.slug!r} is no longer among the built-in lessons")
    if item is None:
        raise LessonFileError(f"no lesson file has the slug {lesson.slug!r}: this lesson was made here")
    with transaction.atomic():
        _apply(lesson, item)


def lesson_render(*, lesson: Lesson) -> SafeString:
    """The lesson's text as HTML. Markdown passes raw HTML through, so what it makes is cleaned: a lesson's
    author writes the words on the page that holds the student's terminal, not scripts that could type in it."""
    html = markdown.markdown(lesson.body, extensions=["fenced_code", "tables", "sane_lists"])
    attributes = {**nh3.ALLOWED_ATTRIBUTES, "code": {"class"}}
    return mark_safe(nh3.clean(html, attributes=attributes, attribute_filter=_language_only))


def _language_only(element: str, attribute: str, value: str) -> str | None:
    """A code block's class is kept only as a fenced block's language, which the page's scripts read."""
    if element == "code" and attribute == "class":
        return value if LANGUAGE_CLASS_RE.fullmatch(value) else None
    return value
