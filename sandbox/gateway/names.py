"""Per-student names on a shared engine.

Every name a student gives (container, image reference, volume) is stored on the engine under a prefix
derived from the namespace and the session id, so two students can both `docker build -t myapp .` and both
`docker run --name web`. Curated images keep their usual names and are shared read-only. Everything the
engine answers is passed through `Namer.unmask` so the student never sees the prefix.

    container "web"                  -> "layercake-s12-web"
    volume "data"                    -> "layercake-s12-data"
    image "myapp:latest"             -> "layercake-s12/myapp:latest"
    image "localhost:5000/me/app:v1" -> "layercake-s12-r/localhost__5000/me/app:v1"
"""

import re
from dataclasses import dataclass
from functools import cached_property

PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN = rf"{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*(?::[0-9]+)?"
TAG = r"[\w][\w.-]{0,127}"
NAME_RE = re.compile(rf"^(?:(?P<domain>{DOMAIN})/)?(?P<path>{PATH_COMPONENT}(?:/{PATH_COMPONENT})*)$")
TAG_RE = re.compile(rf"^{TAG}$")
HEX_RE = re.compile(r"^(?:sha256:)?[a-f0-9]{1,64}$")
CONTAINER_NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
ANY_STUDENT_PREFIX_RE = re.compile(r"^[a-z0-9._-]+-s[0-9]+(?:-r)?/")


class BadReference(ValueError):
    """The student's reference is not one docker would accept; the message is docker's wording."""


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str
    digest: str = ""

    @property
    def familiar_name(self) -> str:
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def familiar(self) -> str:
        if self.digest:
            return f"{self.familiar_name}@{self.digest}"
        return f"{self.familiar_name}:{self.tag}"


def parse_reference(text: str, *, default_tag: str = "latest") -> Reference:
    """Docker's reference grammar `[REGISTRYHOST/][USERNAME/]NAME[:TAG][@DIGEST]`, normalised the way the
    daemon does it (docker.io and library/ are implied)."""
    if not text or len(text) > 255:
        raise BadReference(f"invalid reference format: {text!r}")
    rest, _, digest = text.partition("@")
    if digest and not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
        raise BadReference("invalid reference format")
    name, tag = rest, ""
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1 :]
        if not TAG_RE.match(tag):
            raise BadReference("invalid reference format")
    match = NAME_RE.match(name)
    if match is None:
        if name.lower() != name and NAME_RE.match(name.lower()):
            raise BadReference("invalid reference format: repository name must be lowercase")
        raise BadReference("invalid reference format")
    domain = match.group("domain") or ""
    path = match.group("path")
    first, slash, _ = name.partition("/")
    if domain and slash and not ("." in first or ":" in first or first == "localhost"):
        domain, path = "", name
    if domain in ("docker.io", "index.docker.io"):
        domain = ""
    if not domain and path.startswith("library/") and path.count("/") == 1:
        path = path.removeprefix("library/")
    return Reference(domain=domain, path=path, tag=tag or ("" if digest else default_tag), digest=digest)


def split_repo_tag(text: str) -> tuple[str, str]:
    colon = text.rfind(":")
    if colon > text.rfind("/"):
        return text[:colon], text[colon + 1 :]
    return text, ""


@dataclass(frozen=True)
class Namer:
    namespace: str
    session_id: int

    @property
    def prefix(self) -> str:
        return f"{self.namespace}-s{self.session_id}"

    def container(self, name: str) -> str:
        name = name.lstrip("/")
        if not CONTAINER_NAME_RE.match(name):
            raise BadReference(f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        return f"{self.prefix}-{name}"

    def volume(self, name: str) -> str:
        if not VOLUME_NAME_RE.match(name):
            raise BadReference(
                f'create {name}: "{name}" includes invalid characters for a local volume name, '
                'only "[a-zA-Z0-9][a-zA-Z0-9_.-]" are allowed. If you intended to pass a host directory, '
                "use absolute path"
            )
        return f"{self.prefix}-{name}"

    def owns_plain(self, engine_name: str) -> bool:
        return engine_name.lstrip("/").startswith(f"{self.prefix}-")

    def plain(self, engine_name: str) -> str:
        """A container or volume name as the student knows it."""
        slash = "/" if engine_name.startswith("/") else ""
        bare = engine_name.lstrip("/")
        return slash + bare.removeprefix(f"{self.prefix}-")

    def image_repo(self, ref: Reference) -> str:
        """The engine repository (no tag) for a student's own reference."""
        if ref.domain:
            if ref.domain.lower() != ref.domain:
                raise BadReference("invalid reference format: registry host must be lowercase")
            return f"{self.prefix}-r/{ref.domain.replace(':', '__')}/{ref.path}"
        return f"{self.prefix}/{ref.path}"

    def image_tag(self, ref: Reference) -> str:
        return f"{self.image_repo(ref)}:{ref.tag}"

    def owns_repo_tag(self, repo_tag: str) -> bool:
        return repo_tag.startswith((f"{self.prefix}/", f"{self.prefix}-r/"))

    @cached_property
    def _unmask_re(self) -> re.Pattern[str]:
        prefix = re.escape(self.prefix)
        return re.compile(rf"(?<![\w.-]){prefix}(?:-r/(?P<domain>[a-z0-9._-]+)/|/|-(?=[a-zA-Z0-9]))")

    def unmask(self, text: str) -> str:
        if self.prefix not in text:
            return text

        def replace(match: re.Match[str]) -> str:
            domain = match.group("domain")
            return domain.replace("__", ":") + "/" if domain else ""

        return self._unmask_re.sub(replace, text)


def is_student_repo_tag(repo_tag: str) -> bool:
    return bool(ANY_STUDENT_PREFIX_RE.match(repo_tag))
