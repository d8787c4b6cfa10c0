"""The sixth pass at what a student, or anyone else who reaches the site, could do through it: what the
earlier passes (test_site_security.py) did not try."""

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from lessons.models import Lesson
from lessons.services import lessons_load

LESSON_FILE = "---\nslug: filed\ntitle: Filed\n---\nAs the file has it.\n"


@pytest.mark.django_db
def test_a_staff_member_who_may_only_view_lessons_cannot_put_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lessons.services.CONTENT_DIR", tmp_path)
    (tmp_path / "filed.md").write_text(LESSON_FILE)
    lesson = lessons_load(directory=tmp_path).created[0]
    Lesson.objects.filter(pk=lesson.pk).update(body="An editor's work.\n")
    viewer = User.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_lesson"))
    browser = Client()
    browser.force_login(viewer)
    changelist = reverse("admin:lessons_lesson_changelist")
    assert browser.get(changelist).status_code == 200
    assert "put_back" not in browser.get(changelist).content.decode()

    browser.post(changelist, {"action": "put_back", "_selected_action": [lesson.pk]})
    lesson.refresh_from_db()
    assert lesson.body == "An editor's work.\n"
