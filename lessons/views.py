from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from sandbox.models import Sandbox
from sandbox.owners import owner_key_for_request
from sandbox.selectors import sandbox_for_owner

from .models import Lesson
from .selectors import lesson_list
from .services import lesson_render


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "lessons/lesson_list.html", {"lessons": lesson_list()})


def detail(request: HttpRequest, slug: str) -> HttpResponse:
    lesson = get_object_or_404(Lesson, slug=slug)
    sandbox = sandbox_for_owner(owner_key=owner_key_for_request(request), lesson=lesson)
    return lesson_page(request, lesson, sandbox=sandbox)


def lesson_page(
    request: HttpRequest,
    lesson: Lesson,
    *,
    sandbox: Sandbox | None,
    error: str | None = None,
    stoppable: list[Sandbox] | None = None,
    status: int = 200,
) -> HttpResponse:
    """The lesson with its sandbox panel; the panel says `error` instead where a start was refused."""
    context = {
        "lesson": lesson,
        "body_html": lesson_render(lesson=lesson),
        "sandbox": sandbox,
        "error": error,
        "stoppable": stoppable or [],
        "lessons": lesson_list(),
    }
    return render(request, "lessons/lesson_detail.html", context, status=status)
