from django.urls import path

from . import views
from .ports import port_proxy, ports

app_name = "sandbox"

urlpatterns = [
    path("start/", views.start, name="start"),
    path("<int:pk>/", views.panel, name="panel"),
    path("<int:pk>/stop/", views.stop, name="stop"),
    path("<int:pk>/replace/", views.replace, name="replace"),
    path("<int:pk>/ports/", ports, name="ports"),
    path("<int:pk>/port/<int:port>/", port_proxy, name="port"),
    path("<int:pk>/port/<int:port>/<path:path>", port_proxy, name="port-path"),
]
