from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from lessons.models import Lesson
from lessons.views import lesson_page

from . import services
from .models import EndReason, Sandbox
from .owners import owner_key_for_request, owner_key_new, owner_key_remember
from .selectors import sandbox_owned


def _panel(request: HttpRequest, **context: object) -> HttpResponse:
    context.setdefault("error", None)
    context.setdefault("stoppable", [])
    return render(request, "sandbox/panel.html", context)


def _respond(request: HttpRequest, lesson: Lesson | None, **context: object) -> HttpResponse:
    if request.headers.get("HX-Request") or lesson is None:
        return _panel(request, lesson=lesson, **context)
    return redirect(lesson)


def _refused(
    request: HttpRequest, lesson: Lesson, error: str, *, status: int, stoppable: list[Sandbox] | None = None
) -> HttpResponse:
    if request.headers.get("HX-Request"):
        response = _panel(request, lesson=lesson, sandbox=None, error=error, stoppable=stoppable or [])
        response.status_code = status
        return response
    return lesson_page(request, lesson, sandbox=None, error=error, stoppable=stoppable, status=status)


def _launch(
    request: HttpRequest, lesson: Lesson, *, owner_key: str, replacing: Sandbox | None = None
) -> HttpResponse:
    address = request.META.get("REMOTE_ADDR", "")
    try:
        if replacing is None:
            sandbox = services.sandbox_start(
                owner_key=owner_key, user=request.user, lesson=lesson, client_address=address
            )
        else:
            sandbox = services.sandbox_replace(
                sandbox=replacing, user=request.user, lesson=lesson, client_address=address
            )
    except services.TooManySandboxes as exc:
        return _refused(request, lesson, str(exc), status=429, stoppable=exc.stoppable)
    except services.SandboxFull as exc:
        response = _refused(request, lesson, str(exc), status=503)
        response["Retry-After"] = "30"
        return response
    owner_key_remember(request, owner_key)
    return _respond(request, lesson, sandbox=sandbox)


@require_POST
def start(request: HttpRequest) -> HttpResponse:
    lesson = get_object_or_404(Lesson, slug=request.POST.get("lesson", ""))
    return _launch(request, lesson, owner_key=owner_key_for_request(request) or owner_key_new())


@require_POST
def replace(request: HttpRequest, pk: int) -> HttpResponse:
    """Stop one of the student's sandboxes, on whatever lesson, and start this lesson's in its place."""
    replacing = sandbox_owned(owner_key=owner_key_for_request(request), sandbox_id=pk)
    if replacing is None:
        raise Http404("No such sandbox.")
    lesson = get_object_or_404(Lesson, slug=request.POST.get("lesson", ""))
    return _launch(request, lesson, owner_key=replacing.owner_key, replacing=replacing)


@require_POST
def stop(request: HttpRequest, pk: int) -> HttpResponse:
    sandbox = sandbox_owned(owner_key=owner_key_for_request(request), sandbox_id=pk)
    if sandbox is None:
        raise Http404("No such sandbox.")
    sandbox = services.sandbox_stop(sandbox=sandbox, reason=EndReason.STOPPED)
    return _respond(request, sandbox.lesson, sandbox=sandbox)


@require_GET
def panel(request: HttpRequest, pk: int) -> HttpResponse:
    sandbox = sandbox_owned(owner_key=owner_key_for_request(request), sandbox_id=pk)
    if sandbox is None:
        raise Http404("No such sandbox.")
    return _panel(request, lesson=sandbox.lesson, sandbox=sandbox)
