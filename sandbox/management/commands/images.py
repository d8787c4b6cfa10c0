from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from sandbox.images import (
    CatalogError,
    ImageBuildError,
    catalog_entries,
    image_source,
    images_ensure,
    images_status,
)


class Command(BaseCommand):
    help = "Build (or pull) the curated images the sandboxes run, or list them."

    def add_arguments(self, parser: ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{build,list}")
        build = actions.add_parser(
            "build",
            help="Put the catalog's images on the engine, skipping those that are current.",
            description="Put the catalog's images on the engine, skipping those that are current.",
        )
        build.add_argument("names", nargs="*", metavar="NAME", help="Images to build (default: all of them).")
        build.add_argument("--force", action="store_true", help="Build even images that are current.")
        actions.add_parser("list", help="The catalog, and the state of each image on the engine.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["action"] == "build":
                self._build(names=options["names"] or None, force=options["force"])
            else:
                self._list()
        except (CatalogError, ImageBuildError) as exc:
            raise CommandError(str(exc)) from exc

    def _build(self, *, names: list[str] | None, force: bool) -> None:
        self.stdout.write(f"Curated images, from source {image_source()!r}:")
        results = images_ensure(names=names, force=force, progress=self._progress)
        done = ", ".join(f"{result.name} {result.action} ({result.seconds:.1f} s)" for result in results)
        self.stdout.write(self.style.SUCCESS(f"Images ready: {done}"))

    def _progress(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()

    def _list(self) -> None:
        try:
            statuses = images_status()
        except ImageBuildError as exc:
            self.stderr.write(f"The engine's images are not shown: {exc}")
            for entry in catalog_entries():
                self.stdout.write(
                    f"{entry.name:32} {'?':8} {'':>9}  user {entry.user or 'root':10} {entry.purpose}"
                )
            return
        self.stdout.write(f"{'NAME':32} {'STATE':8} {'SIZE':>9}  {'USER':15} PURPOSE")
        for status in statuses:
            size = f"{status.size / 1e6:.1f} MB" if status.size else ""
            user = f"user {status.entry.user or 'root'}"
            self.stdout.write(
                f"{status.entry.name:32} {status.state:8} {size:>9}  {user:15} {status.entry.purpose}"
            )
            if status.detail:
                self.stdout.write(f"    {status.detail}")
