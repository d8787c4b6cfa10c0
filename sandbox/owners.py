"""Who owns a sandbox: a signed-in user, or else the browser's session.

A browser becomes an owner when it starts its first sandbox, not when it merely looks: every other request
only reads the key, so a visitor without a cookie (a crawler, a script) costs no session row per request.
"""

import secrets
from typing import Any

from django.contrib.sessions.backends.base import SessionBase
from django.http import HttpRequest

SESSION_KEY = "layercake_owner"


def owner_key_for_request(request: HttpRequest) -> str | None:
    """The owner behind a request, or None for a browser that has never started a sandbox."""
    if request.user.is_authenticated:
        return f"user-{request.user.pk}"
    key = request.session.get(SESSION_KEY)
    return str(key) if key else None


def owner_key_new() -> str:
    """A key for a browser that is not an owner yet; `owner_key_remember` keeps it once it owns something."""
    return f"anon-{secrets.token_urlsafe(18)}"


def owner_key_remember(request: HttpRequest, owner_key: str) -> None:
    if not request.user.is_authenticated and request.session.get(SESSION_KEY) != owner_key:
        request.session[SESSION_KEY] = owner_key


def owner_key_for_scope(scope: dict[str, Any]) -> str | None:
    """The owner behind a websocket, or None if it has no identity yet."""
    user = scope.get("user")
    if user is not None and user.is_authenticated:
        return f"user-{user.pk}"
    session: SessionBase | None = scope.get("session")
    if session is None:
        return None
    key = session.get(SESSION_KEY)
    return str(key) if key else None
