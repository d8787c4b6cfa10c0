"""The curated image catalog: which images the site runs, and the recipe each one is built from.

The catalog is `catalog.yaml` beside this module (the setting SANDBOX_IMAGE_CATALOG may name another), with
one recipe directory per image under the `recipes/` directory beside it.
Reading it touches neither the engine nor the files a build copies from the host.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from django.conf import settings

CATALOG_PATH = Path(__file__).resolve().parent / "catalog.yaml"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

BuildKind = Literal["dockerfile", "debootstrap"]
BUILD_KINDS: tuple[BuildKind, ...] = ("dockerfile", "debootstrap")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_USER = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]*)?)?$")
_RECIPE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_LABEL = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

_RESERVED_LABELS = {"layercake.managed", "layercake.catalog", "layercake.recipe"}
_ENTRY_KEYS = {"name", "purpose", "pull", "user", "labels", "build"}
_BUILD_KEYS: dict[str, set[str]] = {
    "dockerfile": {"kind", "recipe", "host_files", "host_packages"},
    "debootstrap": {
        "kind",
        "recipe",
        "host_files",
        "host_packages",
        "suite",
        "mirror",
        "packages",
        "prune",
        "keep",
    },
}


class CatalogError(Exception):
    """The catalog file is missing or says something that cannot be built."""


class UnknownImage(CatalogError, KeyError):
    """No catalog entry has that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Debootstrap:
    suite: str
    mirror: str
    packages: tuple[str, ...]
    prune: tuple[str, ...]
    keep: tuple[str, ...]


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    purpose: str
    pull: str
    user: str
    kind: BuildKind
    recipe: Path
    labels: dict[str, str]
    host_files: dict[str, Path]
    host_packages: tuple[str, ...]
    debootstrap: Debootstrap | None
    # The entry as written in the catalog: part of the recipe digest, free of this machine's paths.
    source: dict[str, Any] = field(repr=False, compare=False)


def catalog_path() -> Path:
    return Path(getattr(settings, "SANDBOX_IMAGE_CATALOG", CATALOG_PATH))


def catalog_entries() -> list[CatalogEntry]:
    return catalog_load(path=catalog_path())


def catalog_entry(name: str) -> CatalogEntry:
    """The entry for an image reference; a reference without a tag means its `latest` tag."""
    entries = catalog_entries()
    wanted = reference_with_tag(name)
    for entry in entries:
        if entry.name == wanted:
            return entry
    known = ", ".join(entry.name for entry in entries)
    raise UnknownImage(f"no image {name!r} in the catalog (it has {known})")


def reference_with_tag(reference: str) -> str:
    if "@" in reference or ":" in reference.rsplit("/", 1)[-1]:
        return reference
    return f"{reference}:latest"


def catalog_load(*, path: Path) -> list[CatalogEntry]:
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
    except OSError as exc:
        raise CatalogError(f"cannot read the image catalog {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or set(document) != {"images"} or not isinstance(document["images"], list):
        raise CatalogError(f"{path}: the catalog must be a mapping with one key, `images`, holding a list")
    entries: list[CatalogEntry] = []
    for index, raw in enumerate(document["images"]):
        where = f"{path}: images[{index}]"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            where += f" ({raw['name']})"
        entry = _entry(raw, where=where, recipes=path.parent / "recipes")
        if any(other.name == entry.name for other in entries):
            raise CatalogError(f"{where}: the name {entry.name} appears twice")
        entries.append(entry)
    return entries


def _entry(raw: object, *, where: str, recipes: Path) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: an entry must be a mapping")
    _only_keys(raw, _ENTRY_KEYS, where=where)
    name = _string(raw, "name", where=where)
    if not _REFERENCE.match(name) or "@" in name or reference_with_tag(name) != name:
        raise CatalogError(f"{where}: name must be an image reference with a tag, such as layercake/shell:latest")
    pull = _string(raw, "pull", where=where)
    if not _REFERENCE.match(pull):
        raise CatalogError(f"{where}: pull must be an image reference, such as docker.io/library/busybox:1.36")
    user = _string(raw, "user", where=where, empty=True)
    if not _USER.match(user):
        raise CatalogError(f'{where}: user must be "uid:gid", a user name, or "" for root, not {user!r}')
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(key, str) and _LABEL.match(key) and isinstance(value, str) for key, value in labels.items()
    ):
        raise CatalogError(f'{where}: labels must map label names to quoted strings, such as a.b: "1"')
    if _RESERVED_LABELS & set(labels):
        raise CatalogError(f"{where}: labels must not set {', '.join(sorted(_RESERVED_LABELS))}; the build does")

    build = raw.get("build")
    if not isinstance(build, dict):
        raise CatalogError(f"{where}: build must be a mapping with a kind and a recipe")
    kind = build.get("kind")
    if kind not in BUILD_KINDS:
        raise CatalogError(f"{where}: build.kind must be one of {', '.join(BUILD_KINDS)}, not {kind!r}")
    _only_keys(build, _BUILD_KEYS[kind], where=f"{where} build")
    recipe_name = _string(build, "recipe", where=f"{where} build")
    recipe = recipes / recipe_name
    if not _RECIPE.match(recipe_name) or not (recipe / "Dockerfile").is_file():
        raise CatalogError(
            f"{where}: build.recipe {recipe_name!r} must name a directory of {recipes} with a Dockerfile"
        )

    host_files = build.get("host_files") or {}
    if not isinstance(host_files, dict):
        raise CatalogError(f"{where}: build.host_files must map paths in the build context to files on the host")
    for target, origin in host_files.items():
        if not isinstance(target, str) or not _relative(target):
            raise CatalogError(f"{where}: build.host_files: {target!r} must be a relative path without '..'")
        if not isinstance(origin, str) or not origin.startswith("/"):
            raise CatalogError(f"{where}: build.host_files: {target} must come from an absolute path on the host")
    host_packages = _names(build, "host_packages", where=where)

    debootstrap = None
    if kind == "debootstrap":
        mirror = _string(build, "mirror", where=f"{where} build")
        if not re.match(r"^https?://[^\s/]+(/\S*)?$", mirror):
            raise CatalogError(f"{where}: build.mirror must be an http or https URL, not {mirror!r}")
        debootstrap = Debootstrap(
            suite=_string(build, "suite", where=f"{where} build"),
            mirror=mirror.rstrip("/"),
            packages=_names(build, "packages", where=where),
            prune=_globs(build, "prune", where=where),
            keep=_globs(build, "keep", where=where),
        )

    return CatalogEntry(
        name=name,
        purpose=_string(raw, "purpose", where=where),
        pull=pull,
        user=user,
        kind=cast(BuildKind, kind),
        recipe=recipe,
        labels=dict(labels),
        host_files={target: Path(origin) for target, origin in host_files.items()},
        host_packages=host_packages,
        debootstrap=debootstrap,
        source=raw,
    )


def _only_keys(raw: dict[str, Any], allowed: set[str], *, where: str) -> None:
    unknown = sorted(str(key) for key in raw if key not in allowed)
    if unknown:
        raise CatalogError(f"{where}: unknown key {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _string(raw: dict[str, Any], key: str, *, where: str, empty: bool = False) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or (not empty and not value.strip()):
        kind = "a string" if empty else "a non-empty string"
        raise CatalogError(f"{where}: {key} must be {kind}")
    return value


def _names(build: dict[str, Any], key: str, *, where: str) -> tuple[str, ...]:
    value = build.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) and _PACKAGE.match(item) for item in value):
        raise CatalogError(f"{where}: build.{key} must be a list of Debian package names")
    return tuple(value)


def _globs(build: dict[str, Any], key: str, *, where: str) -> tuple[str, ...]:
    value = build.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) and _relative(item) for item in value):
        raise CatalogError(f"{where}: build.{key} must be a list of relative paths (globs) without '..'")
    return tuple(value)


def _relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "" not in parts
