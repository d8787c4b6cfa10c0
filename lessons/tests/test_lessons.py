import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import reverse

from lessons.concepts import concepts
from lessons.models import Lesson
from lessons.services import (
    LessonFileError,
    lesson_files,
    lesson_is_edited,
    lesson_parse,
    lesson_render,
    lessons_load,
)

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
    lessons = lessons_load().lessons
    assert lessons
    assert all(lesson.body.strip() for lesson in lessons)


def test_every_concept_of_the_course_is_taught_by_a_built_in_lesson() -> None:
    taught = {concept for item in lesson_files().values() for concept in item.concepts}
    assert set(concepts()) - taught == set()


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("image: layercake/nothing:latest", "'image': no image 'layercake/nothing:latest' in the catalog"),
        ("concepts: [C1, C99]", "'concepts': no concept C99 in the course"),
        ("concepts: [C1, C1]", "C1 named twice"),
        ("position: -1", "'position'"),
        ("position: true", "whole number"),
    ],
)
def test_a_file_naming_what_the_site_does_not_have_is_refused(line: str, complaint: str) -> None:
    with pytest.raises(LessonFileError, match=r"bad\.md") as error:
        lesson_parse(text=f"---\nslug: bad\ntitle: Bad\n{line}\n---\nx\n", source="bad.md")
    assert complaint in str(error.value)


def test_a_slug_that_cannot_be_in_an_address_is_refused() -> None:
    with pytest.raises(LessonFileError, match=r"bad\.md: 'slug'"):
        lesson_parse(text="---\nslug: two words\ntitle: Bad\n---\nx\n", source="bad.md")


def _admin_form(lesson: Lesson, **changes: str) -> dict[str, str]:
    form = {
        "slug": lesson.slug,
        "title": lesson.title,
        "summary": lesson.summary,
        "body": lesson.body.replace("\n", "\r\n"),
        "position": str(lesson.position),
        "image": lesson.image,
        "concepts": json.dumps(lesson.concepts),
    }
    return form | changes


@pytest.mark.django_db
def test_an_edit_made_in_the_admin_outlives_the_next_load_until_it_is_put_back(
    tmp_path: Path, admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lessons.services.CONTENT_DIR", tmp_path)
    (tmp_path / "a.md").write_text(GOOD)
    lesson = lessons_load(directory=tmp_path).created[0]
    change = reverse("admin:lessons_lesson_change", args=[lesson.pk])

    assert admin_client.post(change, _admin_form(lesson)).status_code == 302
    lesson.refresh_from_db()
    assert not lesson_is_edited(lesson=lesson), "saving a lesson unchanged is no edit"

    assert admin_client.post(change, _admin_form(lesson, body="Mine.\r\n")).status_code == 302
    (tmp_path / "a.md").write_text(GOOD.replace("Some *text*.", "New text."))
    report = lessons_load(directory=tmp_path)
    assert (report.kept, report.conflicts) == ([lesson], [lesson])
    lesson.refresh_from_db()
    assert lesson.body == "Mine.\n"
    listing = admin_client.get(reverse("admin:lessons_lesson_changelist")).content.decode()
    assert "built-in, edited" in listing

    response = admin_client.post(
        reverse("admin:lessons_lesson_changelist"), {"action": "put_back", "_selected_action": [lesson.pk]}
    )
    assert response.status_code == 302
    lesson.refresh_from_db()
    assert lesson.body == "New text.\n"
    assert lessons_load(directory=tmp_path).unchanged == [lesson]


@pytest.mark.django_db
def test_a_lesson_made_in_the_admin_is_not_taken_over_by_a_file_with_its_slug(
    tmp_path: Path, admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = Lesson(slug="first", title="Made here", body="Mine.\n", concepts=[])
    add = admin_client.post(reverse("admin:lessons_lesson_add"), _admin_form(made))
    assert add.status_code == 302
    (tmp_path / "a.md").write_text(GOOD)
    report = lessons_load(directory=tmp_path)
    assert ([lesson.title for lesson in report.clashes], report.created) == (["Made here"], [])
    monkeypatch.setattr("lessons.services.CONTENT_DIR", tmp_path / "none")
    (tmp_path / "none").mkdir()
    response = admin_client.post(
        reverse("admin:lessons_lesson_changelist"),
        {"action": "put_back", "_selected_action": [Lesson.objects.get().pk]},
        follow=True,
    )
    said = [str(message) for message in response.context["messages"]]
    assert said[-1] == "no lesson file has the slug 'first': this lesson was made here"
    assert Lesson.objects.get().body == "Mine.\n"


@pytest.mark.django_db
def test_the_admin_refuses_an_image_or_concept_the_site_does_not_have(admin_client: Client) -> None:
    lesson = Lesson(slug="x", title="X", body="x\n", concepts=[])
    response = admin_client.post(
        reverse("admin:lessons_lesson_add"),
        _admin_form(lesson, image="nginx:latest", concepts='["C1", "C77"]'),
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "no image &#x27;nginx:latest&#x27; in the catalog" in page
    assert "no concept C77 in the course" in page
    assert not Lesson.objects.exists()


def test_raw_html_in_a_lesson_loses_its_scripts_and_a_code_block_keeps_only_its_language() -> None:
    body = (
        '<script>alert(1)</script>\n\n<a href="javascript:alert(2)" onclick="alert(3)">here</a>'
        " <img src=x onerror=alert(4)>\n\n```sh\necho '<b>hi</b>'\n```\n"
    )
    html = lesson_render(lesson=Lesson(body=body))
    assert "<script" not in html and "alert" not in html
    assert "<code>x</code>" in lesson_render(
        lesson=Lesson(body='<pre><code class="language-sh trap">x</code></pre>')
    )
    assert "<code class=\"language-sh\">echo '&lt;b&gt;hi&lt;/b&gt;'" in html


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


@pytest.mark.django_db(transaction=True)
def test_built_in_lessons_loaded_before_edits_were_kept_are_updated_by_the_next_load() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([("lessons", "0001_initial")])
    old = executor.loader.project_state([("lessons", "0001_initial")]).apps.get_model("lessons", "Lesson")
    built_in = next(iter(lesson_files().values()))
    old.objects.create(slug=built_in.slug, title="An older title", body="Older text.\n", concepts=[])
    old.objects.create(slug="made-here", title="Made here", body="Mine.\n", concepts=[])
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes("lessons"))

    report = lessons_load()
    assert [lesson.slug for lesson in report.updated] == [built_in.slug]
    assert Lesson.objects.get(slug=built_in.slug).title == built_in.title
    assert lesson_is_edited(lesson=Lesson.objects.get(slug="made-here"))


@pytest.mark.django_db
def test_a_built_in_lesson_keeps_its_slug_and_one_whose_file_is_gone_is_told_of(
    tmp_path: Path, admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lessons.services.CONTENT_DIR", tmp_path)
    (tmp_path / "a.md").write_text(GOOD)
    lesson = lessons_load().created[0]
    change = reverse("admin:lessons_lesson_change", args=[lesson.pk])
    assert admin_client.post(change, _admin_form(lesson, slug="renamed")).status_code == 302
    assert list(Lesson.objects.values_list("slug", flat=True)) == ["first"]

    (tmp_path / "a.md").unlink()
    printed = io.StringIO()
    call_command("lessons_load", stdout=printed)
    assert "The built-in lesson 'first' has no file any more" in printed.getvalue()
    listing = admin_client.get(reverse("admin:lessons_lesson_changelist")).content.decode()
    assert "built-in, its file gone" in listing
    response = admin_client.post(
        reverse("admin:lessons_lesson_changelist"),
        {"action": "put_back", "_selected_action": [lesson.pk]},
        follow=True,
    )
    said = [str(message) for message in response.context["messages"]]
    assert said == ["the file of the lesson 'first' is no longer among the built-in lessons"]
