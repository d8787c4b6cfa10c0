from pathlib import Path

import pytest
from django.test import Client

from lessons.models import Lesson
from lessons.services import LessonFileError, lesson_parse, lessons_load

GOOD = "---\nslug: first\ntitle: First\nposition: 2\nconcepts: [C1]\n---\nSome *text*.\n"


def test_parse_reads_front_matter_and_body() -> None:
    parsed = lesson_parse(text=GOOD, source="first.md")
    assert (parsed.slug, parsed.title, parsed.position, parsed.concepts) == ("first", "First", 2, ["C1"])
    assert parsed.body == "Some *text*.\n"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("no front matter", "starts with a '---' line"),
        ("---\nslug: a\ntitle: A\n", "no closing"),
        ("---\n[1, 2\n---\nx", "not valid YAML"),
        ("---\n- a\n---\nx", "must be a mapping"),
        ("---\nslug: a\n---\nx", "'title' is required"),
        ("---\nslug: a\ntitle: A\ncolour: red\n---\nx", "unknown front matter fields: colour"),
        ("---\nslug: a\ntitle: A\nposition: first\n---\nx", "whole number"),
    ],
)
def test_bad_files_name_the_problem(text: str, complaint: str) -> None:
    with pytest.raises(LessonFileError, match=r"bad\.md") as error:
        lesson_parse(text=text, source="bad.md")
    assert complaint in str(error.value)


@pytest.mark.django_db
def test_load_creates_then_updates_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(GOOD)
    lessons_load(directory=tmp_path)
    (tmp_path / "a.md").write_text(GOOD.replace("title: First", "title: Renamed"))
    lessons_load(directory=tmp_path)
    assert list(Lesson.objects.values_list("title", flat=True)) == ["Renamed"]
    (tmp_path / "b.md").write_text("---\nslug: b\n---\n")
    (tmp_path / "a.md").write_text(GOOD.replace("title: First", "title: Again"))
    with pytest.raises(LessonFileError):
        lessons_load(directory=tmp_path)
    assert list(Lesson.objects.values_list("title", flat=True)) == ["Renamed"]


@pytest.mark.django_db
def test_the_built_in_lessons_load() -> None:
    lessons = lessons_load()
    assert lessons
    assert all(lesson.body.strip() for lesson in lessons)


@pytest.mark.django_db
def test_an_unknown_lesson_is_404() -> None:
    assert Client().get("/lessons/no-such-lesson/").status_code == 404


@pytest.mark.django_db
def test_a_lesson_page_renders_its_text_and_a_start_button() -> None:
    lessons_load()
    lesson = Lesson.objects.first()
    assert lesson is not None
    response = Client().get(lesson.get_absolute_url())
    assert response.status_code == 200
    body = response.content.decode()
    assert lesson.title in body
    assert "Start sandbox" in body
