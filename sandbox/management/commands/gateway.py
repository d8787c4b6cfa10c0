import asyncio
import logging
import signal

from django.core.management.base import BaseCommand

from sandbox.gateway.config import gateway_config
from sandbox.gateway.server import Gateway


class Command(BaseCommand):
    help = "Run the per-student Docker API gateway until SIGTERM or SIGINT."

    def handle(self, *args: object, **options: object) -> None:
        logging.getLogger("sandbox.gateway").setLevel(logging.INFO)
        asyncio.run(self._run())

    async def _run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await Gateway(gateway_config()).run(stop)
