"""Who owns a sandbox: a signed-in user, or else the browser's session."""

import secrets
from typing import Any

from django.contrib.sessions.backends.base import SessionBase
from django.http import HttpRequest

SESSION_KEY = "layercake_owner"


def owner_key_for_request(request: HttpRequest) -> str:
    if request.user.is_authenticated:
        return f"user-{request.user.pk}"
    key = request.session.get(SESSION_KEY)
    if not key:
        key = f"anon-{secrets.token_urlsafe(18)}"
        request.session[SESSION_KEY] = key
    return str(key)


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
