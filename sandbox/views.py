from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from lessons.models import Lesson

from . import services
from .models import EndReason
from .owners import owner_key_for_request, owner_key_new, owner_key_remember
from .selectors import sandbox_owned


def _panel(request: HttpRequest, **context: object) -> HttpResponse:
    context.setdefault("error", None)
    return render(request, "sandbox/panel.html", context)


def _respond(request: HttpRequest, lesson: Lesson | None, **context: object) -> HttpResponse:
    if request.headers.get("HX-Request") or lesson is None:
        return _panel(request, lesson=lesson, **context)
    return redirect(lesson)


@require_POST
def start(request: HttpRequest) -> HttpResponse:
    lesson = get_object_or_404(Lesson, slug=request.POST.get("lesson", ""))
    owner_key = owner_key_for_request(request) or owner_key_new()
    try:
        sandbox = services.sandbox_start(
            owner_key=owner_key,
            user=request.user,
            lesson=lesson,
            client_address=request.META.get("REMOTE_ADDR", ""),
        )
    except services.TooManySandboxes as exc:
        response = _panel(request, lesson=lesson, sandbox=None, error=str(exc))
        response.status_code = 429
        return response
    except services.SandboxFull as exc:
        response = _panel(request, lesson=lesson, sandbox=None, error=str(exc))
        response.status_code = 503
        response["Retry-After"] = "30"
        return response
    owner_key_remember(request, owner_key)
    return _respond(request, lesson, sandbox=sandbox)


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
