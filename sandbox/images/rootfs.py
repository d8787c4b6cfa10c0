"""Debian root file systems made by debootstrap, in build directories that never outlive the build."""

import collections
import contextlib
import fnmatch
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from .catalog import Debootstrap
from .errors import ImageBuildError, MirrorUnreachable, RecipeFailed, ToolMissing

Progress = Callable[[str], None]

BUILD_DIR_PREFIX = "rootfs-"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_CHUNK = 1 << 20
# One line per package (retrieving, validating, extracting, unpacking, configuring it): hundreds of them, shown
# only now and then. Every other line of debootstrap's is a step of its own and shown.
_PER_PACKAGE = re.compile(
    r"^I: (?:(?:Retrieving|Validating) \S+ [0-9]\S*|(?:Extracting|Unpacking|Configuring) \S+\.\.\.)$"
)
_PER_PACKAGE_EVERY = 5.0


def debootstrap_command() -> list[str]:
    """debootstrap, told to check what it downloads against Debian's archive keys rather than warn and go on."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which("debootstrap", path=search)
    if found is None:
        raise ToolMissing("debootstrap is not installed on this host; install it: apt-get install debootstrap")
    if shutil.which("gpgv", path=search) is None:
        raise ToolMissing("debootstrap needs gpgv to check the Debian archive; install it: apt-get install gpgv")
    if not DEBIAN_KEYRING.is_file():
        raise ToolMissing(
            f"debootstrap needs Debian's archive keys ({DEBIAN_KEYRING}); install them: "
            "apt-get install debian-archive-keyring"
        )
    if os.geteuid() != 0:
        raise ToolMissing("debootstrap must run as root: run the image build as root (for example with sudo)")
    return [found, f"--keyring={DEBIAN_KEYRING}"]


def mirror_check(*, mirror: str, suite: str, timeout: float = 20) -> None:
    url = f"{mirror}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        raise MirrorUnreachable(
            f"the Debian mirror answered {exc.code} for {url}: check the suite and mirror in the catalog"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MirrorUnreachable(
            f"the Debian mirror {mirror} cannot be reached ({reason}); debootstrap needs it to build {suite}"
        ) from exc


def rootfs_debootstrap(
    *, debootstrap: list[str], target: Path, spec: Debootstrap, cache_dir: Path, progress: Progress
) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [*debootstrap, "--variant=minbase", f"--cache-dir={cache_dir.resolve()}"]
    if spec.packages:
        command.append(f"--include={','.join(spec.packages)}")
    command += [spec.suite, str(target), spec.mirror]
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]),
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
    }
    recent: collections.deque[str] = collections.deque(maxlen=10)
    packages_seen = 0
    shown_at = 0.0
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=environment,
        text=True,
        errors="replace",
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            if not line:
                continue
            recent.append(line)
            if _PER_PACKAGE.match(line):
                packages_seen += 1
                if time.monotonic() - shown_at < _PER_PACKAGE_EVERY:
                    continue
                line = f"{line}  ({packages_seen} package steps so far)"
            shown_at = time.monotonic()
            progress(f"debootstrap: {line.removeprefix('I: ')}")
        status = process.wait()
    if status != 0:
        lines = list(recent)
        # The log it points to goes with the build directory: its end is kept in the error.
        if any("debootstrap.log" in line for line in lines):
            lines += ["", "The end of debootstrap.log:", *_log_tail(target)]
        raise RecipeFailed(f"debootstrap {spec.suite} failed (exit status {status}):\n" + "\n".join(lines))


def _log_tail(target: Path, lines: int = 15) -> list[str]:
    try:
        text = (target / "debootstrap" / "debootstrap.log").read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def rootfs_prune(*, root: Path, prune: tuple[str, ...], keep: tuple[str, ...]) -> tuple[int, int]:
    """Delete what matches `prune` except what matches `keep`; return the files and bytes deleted."""
    root = root.resolve()
    files = size = 0

    def kept(path: Path) -> bool:
        relative = path.relative_to(root).as_posix()
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in keep)

    def delete(path: Path) -> None:
        nonlocal files, size
        if kept(path):
            return
        size += path.lstat().st_size
        files += 1
        path.unlink()

    for pattern in prune:
        for match in sorted(root.glob(pattern), reverse=True):
            # A glob never leaves the root through a symbolic link of the root file system.
            if not match.parent.resolve().is_relative_to(root):
                continue
            if match.is_symlink() or not match.is_dir():
                delete(match)
                continue
            for directory, subdirectories, names in os.walk(match, topdown=False):
                here = Path(directory)
                for name in names:
                    delete(here / name)
                for name in subdirectories:
                    if (here / name).is_symlink():
                        delete(here / name)
                    else:
                        with contextlib.suppress(OSError):
                            (here / name).rmdir()
            with contextlib.suppress(OSError):
                match.rmdir()
    return files, size


@contextlib.contextmanager
def rootfs_tar(root: Path) -> Iterator[Iterator[bytes]]:
    """The root file system as a tar stream, read in chunks; raises if tar failed once it is consumed."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            ["tar", "--numeric-owner", "--one-file-system", "-C", str(root), "-cf", "-", "."],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        assert process.stdout is not None
        stdout = process.stdout
        try:
            yield iter(lambda: stdout.read(_CHUNK), b"")
        finally:
            stdout.close()
            status = process.wait()
        if status != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
            raise RecipeFailed(f"tar of the root file system failed (exit status {status}): {message}")


def build_dir_create(*, parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{BUILD_DIR_PREFIX}{name}-", dir=parent))


def build_dir_remove(path: Path) -> None:
    """Unmount whatever an interrupted debootstrap left mounted inside, then delete the directory."""
    path = path.resolve()
    for mount in _mounts_under(path):
        subprocess.run(["umount", "--lazy", mount], check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(f"{path} still has mounts inside ({', '.join(left)}); unmount them, then delete it")
    if path.exists():
        shutil.rmtree(path)


def build_dirs_stale(parent: Path) -> list[Path]:
    """Build directories a killed build left behind; only meaningful while holding the build lock."""
    if not parent.is_dir():
        return []
    return sorted(path for path in parent.glob(f"{BUILD_DIR_PREFIX}*") if path.is_dir())


def _mounts_under(path: Path) -> list[str]:
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    inside = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4])
        if point == str(path) or point.startswith(f"{path}/"):
            inside.append(point)
    return sorted(inside, key=len, reverse=True)
