from django.conf import settings
from django.utils.module_loading import import_string

from .base import SandboxBackend

_backends: dict[str, SandboxBackend] = {}


def get_backend() -> SandboxBackend:
    """The backend named by the SANDBOX_BACKEND setting, one instance per process."""
    path = settings.SANDBOX_BACKEND
    if path not in _backends:
        _backends[path] = import_string(path)()
    return _backends[path]
