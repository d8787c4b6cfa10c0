from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

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
    context = {
        "lesson": lesson,
        "body_html": lesson_render(lesson=lesson),
        "sandbox": sandbox,
        "error": None,
        "lessons": lesson_list(),
    }
    return render(request, "lessons/lesson_detail.html", context)
