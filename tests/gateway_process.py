"""The gateway as the supervisor runs it, for the tests that need one."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from django.conf import settings

BASE_DIR = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """`manage.py gateway` as the supervisor runs it, in a child process of the test run."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(settings.GATEWAY_DIR).parent / f"{settings.SANDBOX_NAMESPACE}.log"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tutorial.settings.test",
            "LAYERCAKE_SANDBOX_NAMESPACE": settings.SANDBOX_NAMESPACE,
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "gateway"], cwd=BASE_DIR, env=env, stdout=log, stderr=log
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
