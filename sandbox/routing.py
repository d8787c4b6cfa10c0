from django.urls import path

from .consumers import TerminalConsumer

websocket_urlpatterns = [
    path("ws/sandbox/<int:pk>/terminal/", TerminalConsumer.as_asgi()),
]
