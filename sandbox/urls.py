from django.urls import path

from . import views

app_name = "sandbox"

urlpatterns = [
    path("start/", views.start, name="start"),
    path("<int:pk>/", views.panel, name="panel"),
    path("<int:pk>/stop/", views.stop, name="stop"),
]
