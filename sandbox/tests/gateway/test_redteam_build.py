"""Builds that read one way to a naive parser and another to the engine's: each would reach another student's
image (FROM or COPY --from), forge a reserved label, or hide ONBUILD, and each is refused."""

import gzip
import io
import json
import lzma
import tarfile
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import docker
import pytest

from .conftest import KEY_STEP, StudentSession, owned_objects, printed_key

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _context(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            if name in (symlinks or {}):
                link = tarfile.TarInfo(name)
                link.type = tarfile.SYMTYPE
                link.linkname = (symlinks or {})[name]
                archive.addfile(link)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _build(student: StudentSession, context: bytes, query: str = "t=probe") -> Any:
    return student.call(
        "POST", f"/v1.41/build?{query}", body=context, headers={"Content-Type": "application/x-tar"}
    )


@pytest.fixture
def other_image(student_factory: Any, curated_image: str) -> str:
    """Another student's image, the target of the tricks below."""
    alice: StudentSession = student_factory()
    built = _build(alice, _context({"Dockerfile": f"FROM {curated_image}\nRUN echo alice > /secret\n".encode()}))
    assert built.status == 200 and b"Successfully built" in built.body, built.body
    return str(alice.call("GET", "/v1.41/images/probe/json").json()["Id"])


NOT_THERE = "No such image"
REFUSED_CHARACTERS = "control characters or unusual white space"
URL = "ADD of a URL or of a variable source"
RESERVED = "labels starting with 'layercake.' are reserved"
# Each trick, and what the student is told: the image it reaches is not theirs, or the sandbox refuses it.
TRICKS = {
    "byte-order mark": ("\ufeffFROM {other}\n", NOT_THERE),
    "tab after FROM": ("FROM\t{other}\n", NOT_THERE),
    "instruction word split by a continuation": ("FR\\\nOM {other}\n", NOT_THERE),
    "vertical tab after the continuation": ("FROM {curated}\nRUN true \\\x0b\nFROM {other}\n", REFUSED_CHARACTERS),
    "escape directive after an unknown one": (
        "# foo=bar\n# escape=`\nFROM {curated}\nRUN true `\nFROM {other}\n",
        "escape parser directive must be the first line",
    ),
    "flag after a byte docker reads as a space": (
        "FROM {curated}\nCOPY --chown=0\u00e0--from={other} /secret /s\n",
        "non-ASCII",
    ),
    "COPY --from split by a continuation": ("FROM {curated}\nCOPY --fr\\\nom={other} /secret /s\n", NOT_THERE),
    "ONBUILD with a dotted capital I": ("FROM {curated}\nONBU\u0130LD RUN true\n", "unknown instruction"),
    "reserved label behind an escape": ("FROM {curated}\nLABEL layercake\\.role=workstation\n", RESERVED),
    "reserved label behind quotes": ('FROM {curated}\nLABEL layer"cake.ro"le=workstation\n', RESERVED),
    "ADD of a URL behind an escape": ("FROM {curated}\nADD http\\://127.0.0.1:9/x /x\n", URL),
    "image ID prefix that names its own stage": ("FROM {short} AS {short}\n", ""),
    "ADD of a URL in JSON with an escaped colon": (
        'FROM {curated}\nADD ["http\\u003a//127.0.0.1:9/x", "/x"]\n',
        "JSON escapes",
    ),
    "ADD of a variable in JSON with an escaped dollar": (
        'FROM {curated}\nENV U=http://127.0.0.1:9/x\nADD ["\\u0024U", "/x"]\n',
        "JSON escapes",
    ),
    "COPY --from the stage's own name, an image's within it": (
        "FROM {curated} AS tools\nCOPY --from=tools /x /x\n",
        "pull access denied for tools",
    ),
    "ADD in JSON with escapes, and text after the array": (
        'FROM {curated}\nADD ["http:\\u002f\\u002f127.0.0.1:9/x", "/x"] x\n',
        "JSON escapes",
    ),
    "HEALTHCHECK with an option the check does not know": (
        "FROM {curated}\nHEALTHCHECK --start-period=1000h --start-interval=1ms CMD false\n",
        "--start-interval",
    ),
    "ADD of deeply nested brackets": ("FROM {curated}\nADD " + "[" * 100_000 + "\n", ""),
    "HEALTHCHECK every millisecond": (
        "FROM {curated}\nHEALTHCHECK --interval=1ms CMD true\n",
        "HEALTHCHECK --interval must be at least 1s",
    ),
}


@pytest.mark.parametrize("trick", TRICKS, ids=list(TRICKS))
def test_dockerfile_read_as_the_engine_reads_it(
    student: StudentSession, other_image: str, curated_image: str, engine: docker.APIClient, trick: str
) -> None:
    short = other_image.removeprefix("sha256:")[:12]
    dockerfile, said = TRICKS[trick]
    if trick == "image ID prefix that names its own stage":
        # A stage name must start with a letter: an ID prefix that does not is refused as a name.
        # Otherwise it is a name the engine would pull, as it would one that names no image at all.
        said = "invalid name for build stage" if short[0].isdigit() else "pull access denied"
    answer = _build(
        student,
        _context(
            {"Dockerfile": dockerfile.format(other=other_image, curated=curated_image, short=short).encode()}
        ),
    )
    assert answer.status in (400, 403, 404), answer.body
    assert said in answer.message, answer.message
    assert b"Successfully built" not in answer.body, answer.body
    assert owned_objects(engine, student)["images"] == []


def test_dockerfile_replaced_through_a_symlinked_directory_is_refused(
    student: StudentSession, other_image: str, curated_image: str, engine: docker.APIClient
) -> None:
    context = _context(
        {
            "Dockerfile": f"FROM {curated_image}\n".encode(),
            "sub": b"",
            "sub/Dockerfile": f"FROM {other_image}\n".encode(),
        },
        symlinks={"sub": "."},
    )
    answer = _build(student, context)
    assert answer.status == 403 and "symbolic link" in answer.message, answer.body
    assert owned_objects(engine, student)["images"] == []


def test_compressed_context_is_expanded_within_the_limit(student: StudentSession, curated_image: str) -> None:
    import gzip

    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    answer = _build(student, bomb)
    assert answer.status == 413, answer.body
    small = gzip.compress(_context({"Dockerfile": f"FROM {curated_image}\nLABEL ok=1\n".encode()}))
    built = _build(student, small)
    assert built.status == 200 and b"Successfully tagged probe:latest" in built.body, built.body


def test_commit_cannot_forge_a_reserved_label(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    container = student.run(curated_image, ["true"])
    for change in ("LABEL layercake\\.role=workstation", 'LABEL "layer""cake.role"=workstation'):
        answer = student.call("POST", f"/v1.41/commit?container={container}&changes={quote(change)}")
        assert answer.status == 403 and "reserved" in answer.message, answer.body
    assert owned_objects(engine, student)["images"] == []


@pytest.mark.parametrize(
    "text",
    [
        "# syntax=x" + " " * 200_000 + "y\nFROM busybox\n",
        "# note=x" + "\t" * 120_000 + "y\n# another=x" + " " * 120_000 + "y\nFROM busybox\n",
    ],
    ids=["long first-line directive", "long directive-like comments"],
)
def test_a_long_line_is_read_in_linear_time(text: str) -> None:
    """The gateway reads Dockerfiles on its event loop: a line that took the regex quadratic time froze every
    student's docker for minutes."""
    from sandbox.gateway import policy

    started = time.monotonic()
    plan = policy.dockerfile_plan(text)
    assert list(plan.images.values()) == ["busybox"]
    assert time.monotonic() - started < 2
    changes = ["ENV x=y" + " " * 30_000 + "z"]
    started = time.monotonic()
    assert len(policy.commit_changes(changes)) >= 1
    assert time.monotonic() - started < 2


def _image_id(student: StudentSession, name: str = "probe") -> str:
    return str(student.call("GET", f"/v1.41/images/{name}/json").json()["Id"])


def test_a_build_reuses_no_step_another_student_ran(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    """The builder's cache is the engine's: the same step on the same image, built by another student, was
    reused, telling this one it had been run and handing them what it made. Each student's builds reuse their
    own steps, and only those."""
    started = time.time() - 1
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    dockerfile = f"FROM {curated_image}\n{KEY_STEP}\n"
    context = _context({"Dockerfile": dockerfile.encode()})
    first = _build(alice, context)
    assert first.status == 200 and b"Successfully tagged probe:latest" in first.body, first.body
    key = printed_key(first.body)
    built = _image_id(alice)

    # Bob has an image of his own, so his build has a cache, of his images alone.
    own = _build(bob, _context({"Dockerfile": f"FROM {curated_image}\nRUN echo bob > /bob\n".encode()}), "t=own")
    assert own.status == 200 and b"Successfully tagged own:latest" in own.body, own.body
    theirs = _build(bob, context)
    assert theirs.status == 200 and b"Successfully tagged probe:latest" in theirs.body, theirs.body
    assert b"Using cache" not in theirs.body and key not in theirs.body, theirs.body
    assert printed_key(theirs.body) != key
    # Naming the other's image as a source changes nothing: to this student it does not exist.
    named = _build(bob, context, f"t=named&cachefrom={quote(json.dumps([built]))}")
    assert named.status == 200 and b"Using cache" not in named.body, named.body

    again = _build(alice, context)
    assert again.status == 200 and b"Using cache" in again.body and key not in again.body, again.body
    assert _image_id(alice) == built
    # The name moves to another image, and the first is left dangling: it is still the student's own, and
    # its steps are still reused.
    other = _build(alice, _context({"Dockerfile": f"FROM {curated_image}\nRUN echo two > /two\n".encode()}))
    assert other.status == 200 and b"Using cache" not in other.body, other.body
    back = _build(alice, context)
    assert back.status == 200 and b"Using cache" in back.body and key not in back.body, back.body
    assert _image_id(alice) == built
    # Reusing her steps, the engine stood her image on copies of them (Bob's same step came first): what it
    # stood on went, and nothing is left that no one can name, nor see as theirs.
    left = [
        image
        for image in engine.images(filters={"dangling": True})
        if image["Created"] >= started and "layercake.session" not in (image.get("Labels") or {})
    ]
    assert not left, left

    answer = _build(alice, context, "t=probe&cachefrom=" + quote('{"not": "a list"}'))
    assert answer.status == 400 and "cachefrom" in answer.message, answer.body


@pytest.mark.parametrize("compress", ["", "gz", "xz"])
def test_add_of_an_archive_that_the_engine_would_unpack_is_refused(
    student: StudentSession, curated_image: str, engine: docker.APIClient, compress: str
) -> None:
    """ADD unpacks a tar archive of the context in the engine itself, in no container the disk watch could
    stop: a few MB of compressed zeros become many GB of the disk every student shares."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as bomb:
        info = tarfile.TarInfo("zeros")
        info.size = 4 * 1024 * 1024
        bomb.addfile(info, io.BytesIO(bytes(info.size)))
    compressors: dict[str, Callable[[bytes], bytes]] = {"": bytes, "gz": gzip.compress, "xz": lzma.compress}
    payload = compressors[compress](plain.getvalue())
    # However the source is spelled: as the engine's Go patterns read it, with a space in JSON form, or
    # through a link, which the engine follows.
    for source, name in (
        ("payload.bin", "payload.bin"),
        ('["pay*.bin", "/unpacked/"]', "payload.bin"),
        ("payloa[^x].bin", "payload.bin"),
        ('["my payload.bin", "/unpacked/"]', "my payload.bin"),
    ):
        add = source if source.startswith("[") else f"{source} /unpacked/"
        files = {"Dockerfile": f"FROM {curated_image}\nADD {add}\n".encode(), name: payload}
        answer = _build(student, _context(files))
        assert answer.status == 403, answer.body
        assert f"ADD of an archive ({name})" in answer.message and "COPY" in answer.message, answer.message
    files = {
        "Dockerfile": f"FROM {curated_image}\nADD link /unpacked/\n".encode(),
        "payload.bin": payload,
        "link": b"",
    }
    answer = _build(student, _context(files, symlinks={"link": "payload.bin"}))
    assert answer.status == 403 and "ADD of a link (link)" in answer.message, answer.body
    assert not owned_objects(engine, student)["images"]
    # What the engine would not unpack is added as it is (text, and a compressed file that holds no tar
    # archive), and the archive itself may be copied.
    dockerfile = f"FROM {curated_image}\nADD notes.txt data.csv.gz /\nCOPY payload.bin /\nRUN ls -l /data.csv.gz\n"
    context = _context(
        {
            "Dockerfile": dockerfile.encode(),
            "notes.txt": b"BZh is not always bzip2\n",
            "data.csv.gz": gzip.compress(b"a,b\n" * 1000),
            "payload.bin": payload,
        }
    )
    answer = _build(student, context)
    assert answer.status == 200 and b"Successfully tagged probe:latest" in answer.body, answer.body
    assert b"/data.csv.gz" in answer.body, answer.body
