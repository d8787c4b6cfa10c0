"""A recipe's inputs: the files of its directory and the host files it copies, as a build context and as a
digest that changes exactly when one of them, or the catalog entry, changes."""

import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .catalog import CatalogEntry
from .errors import ToolMissing

_PT_INTERP = 3


@dataclass(frozen=True)
class RecipeFile:
    path: str
    data: bytes
    executable: bool
    # Shown by `ls -l` in the image; not part of the digest.
    mtime: int = 0

    @property
    def mode(self) -> int:
        return 0o755 if self.executable else 0o644


def recipe_files(entry: CatalogEntry) -> list[RecipeFile]:
    files = [
        _read(path, path.relative_to(entry.recipe).as_posix())
        for path in sorted(entry.recipe.rglob("*"))
        if path.is_file()
    ]
    taken = {file.path for file in files}
    for target, origin in sorted(entry.host_files.items()):
        needs = f"; install {', '.join(entry.host_packages)}" if entry.host_packages else ""
        try:
            file = _read(origin, target)
        except OSError as exc:
            raise ToolMissing(
                f"{entry.name} needs {origin} from this host, which cannot be read ({exc.strerror}){needs}"
            ) from exc
        if _dynamically_linked(file.data):
            raise ToolMissing(
                f"{entry.name} needs a statically linked {origin}, and this one loads shared libraries that the "
                f"image does not have{needs}"
            )
        if target in taken:
            raise ToolMissing(f"{entry.name}: host file {target} would replace the recipe's own file of that name")
        files.append(file)
    return files


def recipe_digest(entry: CatalogEntry, files: list[RecipeFile] | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(entry.source, sort_keys=True, separators=(",", ":")).encode())
    for file in sorted(files if files is not None else recipe_files(entry), key=lambda file: file.path):
        digest.update(f"\0{file.path}\0{file.mode:o}\0{len(file.data)}\0".encode())
        digest.update(file.data)
    return f"sha256:{digest.hexdigest()}"


def recipe_context(files: list[RecipeFile]) -> bytes:
    """The build context as an uncompressed tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for file in sorted(files, key=lambda file: file.path):
            info = tarfile.TarInfo(file.path)
            info.size = len(file.data)
            info.mode = file.mode
            info.mtime = file.mtime
            tar.addfile(info, io.BytesIO(file.data))
    return buffer.getvalue()


def _read(origin: Path, path: str) -> RecipeFile:
    status = origin.stat()
    return RecipeFile(
        path=path, data=origin.read_bytes(), executable=bool(status.st_mode & 0o111), mtime=int(status.st_mtime)
    )


def _dynamically_linked(data: bytes) -> bool:
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return False
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:
        (table,) = struct.unpack_from(f"{order}Q", data, 32)
        entry_size, count = struct.unpack_from(f"{order}HH", data, 54)
    else:
        (table,) = struct.unpack_from(f"{order}I", data, 28)
        entry_size, count = struct.unpack_from(f"{order}HH", data, 42)
    for index in range(count):
        offset = table + index * entry_size
        if offset + 4 > len(data):
            break
        (kind,) = struct.unpack_from(f"{order}I", data, offset)
        if kind == _PT_INTERP:
            return True
    return False
