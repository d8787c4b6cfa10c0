import asyncio
import os
import socket

from django.core.asgi import get_asgi_application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tutorial.settings.local")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from sandbox.routing import websocket_urlpatterns  # noqa: E402
from tutorial.websocket import SameOriginOnly  # noqa: E402

http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(
            SameOriginOnly(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
        ),
    }
)

# A client that acknowledges nothing the site sends it for this long is dropped by the kernel. uvicorn waits
# for a socket to drain before it closes it, so a tab that stopped reading, a laptop asleep or a network gone
# without a word would otherwise hold its connection, the response it was being sent (and a static file's open
# file) and the buffers before it for as long as the peer lives, or some fifteen minutes of retransmissions.
CLIENT_STALL_SECONDS = 30.0


class HTTPProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, on sockets that give up on a client that acknowledges nothing for
    CLIENT_STALL_SECONDS (TCP_USER_TIMEOUT, which also counts a receive window that stays shut). A websocket is
    upgraded from it on the same socket. Served with `uvicorn --http tutorial.asgi:HTTPProtocol`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(CLIENT_STALL_SECONDS * 1000))
        super().connection_made(transport)
