from typing import Any

from django.core.management.base import BaseCommand

from sandbox.models import EndReason
from sandbox.services import sandbox_end_all


class Command(BaseCommand):
    help = "End every live sandbox and remove what it left on the engine (run when the site stops)."

    def handle(self, *args: Any, **options: Any) -> None:
        ended = sandbox_end_all(reason=EndReason.SHUTDOWN)
        self.stdout.write(f"{len(ended)} sandboxes ended")
