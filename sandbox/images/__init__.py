"""The curated images the sandboxes run: the catalog, and the service that puts them on the engine."""

from .build import ImageResult, ImageStatus, image_source, images_ensure, images_status
from .catalog import CatalogEntry, CatalogError, UnknownImage, catalog_entries, catalog_entry
from .errors import EngineUnreachable, ImageBuildError, MirrorUnreachable, RecipeFailed, ToolMissing

__all__ = [
    "CatalogEntry",
    "CatalogError",
    "EngineUnreachable",
    "ImageBuildError",
    "ImageResult",
    "ImageStatus",
    "MirrorUnreachable",
    "RecipeFailed",
    "ToolMissing",
    "UnknownImage",
    "catalog_entries",
    "catalog_entry",
    "image_source",
    "images_ensure",
    "images_status",
]
