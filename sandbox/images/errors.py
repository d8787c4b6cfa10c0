"""Why a curated image could not be built or pulled. Each message says what went wrong and what to do."""


class ImageBuildError(Exception):
    pass


class EngineUnreachable(ImageBuildError):
    pass


class ToolMissing(ImageBuildError):
    """A program, package or file the build needs on the build host is not there."""


class MirrorUnreachable(ImageBuildError):
    pass


class RecipeFailed(ImageBuildError):
    """debootstrap, the import or a Dockerfile step failed."""
