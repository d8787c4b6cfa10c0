"""Checks a lesson's fields pass wherever the lesson comes from: its file, or the admin."""

from typing import Any

from django.core.exceptions import ValidationError

from sandbox.images import CatalogError, catalog_entry

from .concepts import concepts


def validate_image(value: str) -> None:
    """A lesson's image is one the catalog builds, or empty for the site's default."""
    if not value:
        return
    try:
        catalog_entry(value)
    except CatalogError as exc:
        raise ValidationError(str(exc), code="unknown_image") from exc


def validate_concepts(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError('a list of concept ids, such as ["C1", "C3"]', code="not_a_list")
    unknown = [item for item in value if item not in concepts()]
    if unknown:
        known = ", ".join(concepts())
        raise ValidationError(
            f"no concept {', '.join(unknown)} in the course (it has {known})", code="unknown_concept"
        )
    repeated = sorted({item for item in value if value.count(item) > 1})
    if repeated:
        raise ValidationError(f"{', '.join(repeated)} named twice", code="repeated_concept")
