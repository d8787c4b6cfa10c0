from collections.abc import Iterator

import pytest
from django.test import override_settings

from sandbox import backends

from .fakes import MemoryBackend


@pytest.fixture
def memory_backend() -> Iterator[type[MemoryBackend]]:
    MemoryBackend.running = {}
    MemoryBackend.fail_with = None
    backends._backends.clear()
    with override_settings(SANDBOX_BACKEND="sandbox.tests.fakes.MemoryBackend"):
        yield MemoryBackend
    backends._backends.clear()
