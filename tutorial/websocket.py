"""The site's websockets answer only pages of the site itself."""

from typing import Any

from channels.security.websocket import WebsocketDenier
from django.conf import settings


class SameOriginOnly:
    """Refuses a websocket opened from any page but one of the site as the browser reached it (its scheme, host
    and port, from the request's Host) or of CSRF_TRUSTED_ORIGINS, as Django's CSRF check does for a form.
    Channels' AllowedHostsOriginValidator, which stays in front for the host's name, compares the host alone;
    but a browser sends the site's cookies with a websocket opened from a page on any port of that host, or
    from its https pages, and a page there could then type in the student's terminal."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not is_same_origin(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)


def is_same_origin(scope: dict[str, Any]) -> bool:
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin", b"").decode("latin-1").lower()
    host = headers.get(b"host", b"").decode("latin-1").lower()
    if not origin or not host:
        return False
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    default = {"http": ":80", "https": ":443"}[scheme]
    own = f"{scheme}://{host.removesuffix(default)}"
    return origin == own or origin in {trusted.lower() for trusted in settings.CSRF_TRUSTED_ORIGINS}
