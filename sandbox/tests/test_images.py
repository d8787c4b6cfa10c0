import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from sandbox.images import (
    CatalogError,
    EngineUnreachable,
    ImageBuildError,
    MirrorUnreachable,
    RecipeFailed,
    ToolMissing,
    UnknownImage,
    catalog_entries,
    catalog_entry,
    images_ensure,
)
from sandbox.images.build import CATALOG, RECIPE
from sandbox.images.catalog import catalog_load
from sandbox.images.recipe import recipe_digest, recipe_files
from sandbox.images.rootfs import build_dir_create, build_dir_remove, build_dirs_stale, rootfs_prune

BUSYBOX = "busybox:latest"
SHELL = "layercake/shell:latest"
WORKSTATION = "layercake/workstation:latest"

TINY = """\
images:
  - name: lctest/tiny:latest
    purpose: A test image.
    pull: registry.invalid/lctest/tiny:1
    user: ""
    build: {kind: dockerfile, recipe: tiny}
"""


def _catalog(tmp_path: Path, text: str, dockerfile: str = "FROM scratch\n") -> Path:
    recipe = tmp_path / "recipes" / "tiny"
    recipe.mkdir(parents=True, exist_ok=True)
    (recipe / "Dockerfile").write_text(dockerfile)
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def client() -> Iterator[docker.DockerClient]:
    engine = docker.DockerClient(base_url=settings.SANDBOX_DOCKER_URL, timeout=120)
    yield engine
    engine.close()


def _run(client: docker.DockerClient, image: str, command: list[str]) -> tuple[int, str]:
    """Run a throwaway container, labelled for the namespace purge, and remove it whatever happens."""
    labels = {"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE}
    container = client.containers.create(image, command, labels=labels, network_disabled=True)
    try:
        container.start()
        status = container.wait(timeout=60)
        return int(status["StatusCode"]), container.logs().decode()
    finally:
        container.remove(force=True)


# The catalog.


def test_the_catalog_names_the_curated_images_and_their_users() -> None:
    entries = {entry.name: entry for entry in catalog_entries()}
    assert set(entries) == {BUSYBOX, SHELL, WORKSTATION}
    assert entries[BUSYBOX].user == ""
    assert entries[SHELL].user == "1000:1000"
    assert entries[WORKSTATION].user == "1000:1000"
    assert entries[WORKSTATION].labels["layercake.workstation"] == "1"
    assert entries[BUSYBOX].pull == "docker.io/library/busybox:1.36"
    assert all(entry.purpose for entry in entries.values())


def test_an_entry_is_found_with_or_without_its_latest_tag() -> None:
    assert catalog_entry("layercake/shell").name == SHELL
    assert catalog_entry(SHELL).kind == "debootstrap"


def test_an_unknown_image_is_a_key_error_that_names_the_known_ones() -> None:
    with pytest.raises(KeyError) as caught:
        catalog_entry("layercake/nothing:latest")
    assert isinstance(caught.value, UnknownImage)
    assert str(caught.value).startswith("no image 'layercake/nothing:latest' in the catalog")
    assert SHELL in str(caught.value)


def test_a_good_catalog_loads(tmp_path: Path) -> None:
    (entry,) = catalog_load(path=_catalog(tmp_path, TINY))
    assert entry.name == "lctest/tiny:latest"
    assert entry.recipe == tmp_path / "recipes" / "tiny"
    assert entry.debootstrap is None


@pytest.mark.parametrize(
    ("good", "bad", "message"),
    [
        ("name: lctest/tiny:latest", "name: lctest/tiny", "name must be an image reference with a tag"),
        ("name: lctest/tiny:latest", "name: Not A Name:1", "name must be an image reference"),
        ("pull: registry.invalid/lctest/tiny:1", "pull: ''", "pull must be a non-empty string"),
        ('user: ""', 'user: "1000 1000"', 'user must be "uid:gid"'),
        ('user: ""', "user: 1000", "user must be a string"),
        ("    purpose: A test image.\n", "", "purpose must be a non-empty string"),
        ("purpose: A test image.", "purpose: A test image.\n    porpose: typo", "unknown key porpose"),
        ("kind: dockerfile", "kind: docker", "build.kind must be one of dockerfile, debootstrap"),
        ("recipe: tiny", "recipe: missing", "build.recipe 'missing' must name a directory"),
        ("recipe: tiny}", "recipe: tiny, suite: bookworm}", "unknown key suite"),
        ("recipe: tiny}", "recipe: tiny, host_files: {/etc/x: /etc/x}}", "must be a relative path"),
        ('user: ""', 'user: ""\n    labels: {layercake.recipe: "x"}', "labels must not set"),
        ('user: ""', 'user: ""\n    labels: {a.b: 1}', "labels must map label names to quoted strings"),
        ("images:\n", "images:\n  oops: [\n", "is not valid YAML"),
        ("images:\n", "pictures:\n", "one key, `images`"),
    ],
)
def test_a_bad_catalog_says_what_is_wrong(tmp_path: Path, good: str, bad: str, message: str) -> None:
    assert good in TINY
    path = _catalog(tmp_path, TINY.replace(good, bad))
    with pytest.raises(CatalogError) as caught:
        catalog_load(path=path)
    assert message in str(caught.value)


def test_a_debootstrap_entry_needs_a_suite_and_a_mirror(tmp_path: Path) -> None:
    path = _catalog(
        tmp_path, TINY.replace("{kind: dockerfile, recipe: tiny}", "{kind: debootstrap, recipe: tiny}")
    )
    with pytest.raises(CatalogError, match="build: mirror must be a non-empty string"):
        catalog_load(path=path)


def test_a_name_may_appear_only_once(tmp_path: Path) -> None:
    twice = TINY + TINY.removeprefix("images:\n")
    with pytest.raises(CatalogError, match=r"images\[1\] \(lctest/tiny:latest\): the name .* appears twice"):
        catalog_load(path=_catalog(tmp_path, twice))


def test_a_missing_catalog_is_a_catalog_error(tmp_path: Path) -> None:
    with override_settings(SANDBOX_IMAGE_CATALOG=tmp_path / "none.yaml"), pytest.raises(CatalogError):
        catalog_entries()


# The recipe digest.


def test_the_digest_is_stable_and_changes_exactly_with_the_recipe(tmp_path: Path) -> None:
    path = _catalog(tmp_path, TINY)
    dockerfile = tmp_path / "recipes" / "tiny" / "Dockerfile"
    digest = recipe_digest(catalog_load(path=path)[0])
    assert digest.startswith("sha256:") and len(digest) == 71
    assert recipe_digest(catalog_load(path=path)[0]) == digest

    os.utime(dockerfile, (1, 1))
    reordered = TINY.replace(
        "    purpose: A test image.\n    pull: registry.invalid/lctest/tiny:1\n",
        "    pull:   'registry.invalid/lctest/tiny:1'\n    purpose: A test image.\n",
    ).replace("{kind: dockerfile, recipe: tiny}", "\n      recipe: tiny\n      kind: dockerfile")
    assert reordered != TINY
    path.write_text(reordered)
    assert recipe_digest(catalog_load(path=path)[0]) == digest

    dockerfile.write_text('FROM scratch\nCMD ["sh"]\n')
    changed_file = recipe_digest(catalog_load(path=path)[0])
    assert changed_file != digest

    dockerfile.write_text("FROM scratch\n")
    (tmp_path / "recipes" / "tiny" / "extra").write_text("x")
    assert recipe_digest(catalog_load(path=path)[0]) not in (digest, changed_file)

    (tmp_path / "recipes" / "tiny" / "extra").unlink()
    path.write_text(TINY.replace("A test image.", "Another test image."))
    assert recipe_digest(catalog_load(path=path)[0]) not in (digest, changed_file)


def test_the_curated_digests_are_stable() -> None:
    for entry in catalog_entries():
        assert recipe_digest(entry) == recipe_digest(catalog_entry(entry.name))


def test_a_missing_host_file_names_the_package_to_install(tmp_path: Path) -> None:
    text = TINY.replace(
        "recipe: tiny}",
        f"recipe: tiny, host_files: {{bin/x: {tmp_path}/absent}}, host_packages: [busybox-static]}}",
    )
    (entry,) = catalog_load(path=_catalog(tmp_path, text))
    with pytest.raises(ToolMissing, match=r"cannot be read .*install busybox-static"):
        recipe_files(entry)


def test_a_dynamically_linked_host_binary_is_refused(tmp_path: Path) -> None:
    python = Path(sys.executable).resolve()
    (entry,) = catalog_load(
        path=_catalog(tmp_path, TINY.replace("recipe: tiny}", f"recipe: tiny, host_files: {{bin/x: {python}}}}}"))
    )
    with pytest.raises(ToolMissing, match="needs a statically linked"):
        recipe_files(entry)


def test_the_source_setting_is_checked() -> None:
    with override_settings(SANDBOX_IMAGE_SOURCE="borrow"), pytest.raises(ImageBuildError, match="build, pull"):
        images_ensure(names=[BUSYBOX], progress=print)


# Root file systems and build directories.


def test_pruning_keeps_what_it_is_told_and_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    for name, text in {
        "usr/share/doc/bash/copyright": "license",
        "usr/share/doc/bash/README": "x" * 100,
        "usr/share/man/man1/bash.1.gz": "x" * 50,
        "var/lib/apt/lists/deb.debian.org_Packages": "x" * 1000,
        "etc/passwd": "root:x:0:0::/root:/bin/sh\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "var" / "log").symlink_to(outside)

    files, size = rootfs_prune(
        root=root,
        prune=("usr/share/doc/*", "usr/share/man/*", "var/lib/apt/lists/*", "var/log/*"),
        keep=("usr/share/doc/*/copyright",),
    )

    assert (files, size) == (3, 1150)
    assert (root / "usr/share/doc/bash/copyright").read_text() == "license"
    assert not (root / "usr/share/man/man1").exists()
    assert not list((root / "var/lib/apt/lists").iterdir())
    assert (root / "etc/passwd").exists()
    assert (outside / "precious").read_text() == "keep me"


def test_build_directories_are_removed_and_found_when_left_behind(tmp_path: Path) -> None:
    made = build_dir_create(parent=tmp_path, name="layercake-shell-latest")
    (made / "rootfs" / "etc").mkdir(parents=True)
    (made / "rootfs" / "etc" / "hostname").write_text("sandbox")
    assert build_dirs_stale(tmp_path) == [made]
    build_dir_remove(made)
    assert not made.exists()
    assert build_dirs_stale(tmp_path) == []


# The engine.


def test_an_unreachable_engine_is_a_clear_command_error(tmp_path: Path) -> None:
    with override_settings(SANDBOX_DOCKER_URL=f"unix://{tmp_path}/no-engine.sock"):
        with pytest.raises(EngineUnreachable):
            images_ensure(names=[BUSYBOX], progress=print)
        with pytest.raises(CommandError, match=r"Docker engine at unix://.* cannot be reached"):
            call_command("images", "build", BUSYBOX)


def test_an_unknown_name_is_a_clear_command_error() -> None:
    with pytest.raises(CommandError, match="no image 'nope:latest' in the catalog"):
        call_command("images", "build", "nope:latest")


@pytest.mark.engine
def test_busybox_is_built_in_layers_and_runs(client: docker.DockerClient, engine_cleanup: None) -> None:
    lines: list[str] = []
    (result,) = images_ensure(names=[BUSYBOX], progress=lines.append)
    assert result.action in ("built", "current")

    image = client.api.inspect_image(BUSYBOX)
    assert image["Id"] == result.image_id
    assert len(image["RootFS"]["Layers"]) >= 2
    history = client.api.history(BUSYBOX)
    assert len([step for step in history if step["Size"] > 0]) >= 2
    labels = image["Config"]["Labels"]
    assert labels["layercake.managed"] == "1"
    assert labels[CATALOG] == BUSYBOX
    assert labels[RECIPE] == recipe_digest(catalog_entry(BUSYBOX))

    assert _run(client, BUSYBOX, ["busybox", "echo", "hi"]) == (0, "hi\n")
    assert (
        _run(client, BUSYBOX, ["sh", "-c", "ls /bin/sh /bin/timeout && test -d /tmp && cat /etc/passwd"])[0] == 0
    )


@pytest.mark.engine
def test_a_current_image_is_not_built_again(client: docker.DockerClient) -> None:
    images_ensure(names=[BUSYBOX], progress=lambda line: None)
    lines: list[str] = []
    (result,) = images_ensure(names=[BUSYBOX], progress=lines.append)
    assert result.action == "current"
    assert result.image_id == client.api.inspect_image(BUSYBOX)["Id"]
    assert any(line.startswith(f"{BUSYBOX}: current") for line in lines)
    assert not any("Step " in line for line in lines)


@pytest.mark.engine
def test_the_command_reports_current_images(capsys: pytest.CaptureFixture[str]) -> None:
    images_ensure(names=[BUSYBOX], progress=lambda line: None)
    call_command("images", "build", "busybox")
    call_command("images", "list")
    output = capsys.readouterr().out
    assert f"{BUSYBOX}: current" in output
    assert f"Images ready: {BUSYBOX} current" in output
    assert all(name in output for name in (BUSYBOX, SHELL, WORKSTATION))


def _used_by_a_container(client: docker.DockerClient, image_id: str) -> bool:
    return any(container["ImageID"] == image_id for container in client.api.containers(all=True))


def _dangling(client: docker.DockerClient) -> set[str]:
    return {image["Id"] for image in client.api.images(filters={"dangling": True})}


@pytest.mark.engine
def test_a_forced_rebuild_leaves_no_dangling_image(client: docker.DockerClient) -> None:
    (before,) = images_ensure(names=[BUSYBOX], progress=lambda line: None)
    lines: list[str] = []
    (after,) = images_ensure(names=[BUSYBOX], force=True, progress=lines.append)
    assert after.action == "built"
    assert after.image_id != before.image_id
    assert any("Step " in line for line in lines)
    # Other tests on this engine may be running a container of the image that was replaced.
    assert before.image_id not in _dangling(client) or _used_by_a_container(client, before.image_id)


@pytest.mark.engine
def test_an_image_replaced_while_in_use_goes_once_it_is_not(
    client: docker.DockerClient, engine_cleanup: None
) -> None:
    (before,) = images_ensure(names=[BUSYBOX], progress=lambda line: None)
    labels = {"layercake.managed": "1", "layercake.namespace": settings.SANDBOX_NAMESPACE}
    user = client.containers.create(BUSYBOX, ["true"], labels=labels, network_disabled=True)
    try:
        lines: list[str] = []
        images_ensure(names=[BUSYBOX], force=True, progress=lines.append)
        assert any(f"kept the image it replaced, {before.image_id[7:19]}" in line for line in lines)
        assert before.image_id in _dangling(client)
    finally:
        user.remove(force=True)

    images_ensure(names=[BUSYBOX], progress=lambda line: None)
    assert before.image_id not in _dangling(client) or _used_by_a_container(client, before.image_id)


@pytest.mark.engine
def test_a_failed_step_leaves_nothing_behind(tmp_path: Path, client: docker.DockerClient) -> None:
    images_ensure(names=[BUSYBOX], progress=lambda line: None)
    busybox = client.api.inspect_image(BUSYBOX)["Id"]
    marker = f"lctest.failed={uuid.uuid4().hex}"
    path = _catalog(
        tmp_path,
        TINY,
        dockerfile=f"FROM {BUSYBOX}\nLABEL {marker}\nCOPY Dockerfile /copied\nRUN echo step output && exit 3\n",
    )
    with override_settings(SANDBOX_IMAGE_CATALOG=path), pytest.raises(RecipeFailed) as caught:
        images_ensure(progress=lambda line: None)
    assert "a step of recipes/tiny/Dockerfile failed" in str(caught.value)
    assert "step output" in str(caught.value)
    assert client.api.images(all=True, filters={"label": marker}) == []
    assert client.api.inspect_image(BUSYBOX)["Id"] == busybox
    with pytest.raises(docker.errors.ImageNotFound):
        client.api.inspect_image("lctest/tiny:latest")


@pytest.mark.engine
def test_an_unreachable_mirror_is_a_clear_error_and_leaves_no_build_directory(tmp_path: Path) -> None:
    text = TINY.replace(
        "{kind: dockerfile, recipe: tiny}",
        "{kind: debootstrap, recipe: tiny, suite: bookworm, mirror: 'http://127.0.0.1:9/debian'}",
    )
    with override_settings(SANDBOX_IMAGE_CATALOG=_catalog(tmp_path, text)):
        with pytest.raises(CommandError, match=r"mirror http://127.0.0.1:9/debian cannot be reached"):
            call_command("images", "build")
        with pytest.raises(MirrorUnreachable):
            images_ensure(progress=lambda line: None)
    assert build_dirs_stale(Path(settings.DATA_DIR) / "build") == []


@pytest.mark.engine
@pytest.mark.slow
def test_a_failed_debootstrap_says_why_and_leaves_no_build_directory(tmp_path: Path) -> None:
    text = TINY.replace(
        "{kind: dockerfile, recipe: tiny}",
        "{kind: debootstrap, recipe: tiny, suite: bookworm, mirror: 'http://deb.debian.org/debian',"
        " packages: [lctest-no-such-package]}",
    )
    lines: list[str] = []
    with (
        override_settings(SANDBOX_IMAGE_CATALOG=_catalog(tmp_path, text)),
        pytest.raises(RecipeFailed, match=r"(?s)debootstrap bookworm failed .*lctest-no-such-package"),
    ):
        images_ensure(progress=lines.append)
    assert any("debootstrap: Retrieving InRelease" in line for line in lines)
    assert build_dirs_stale(Path(settings.DATA_DIR) / "build") == []


@pytest.mark.engine
def test_pulling_without_a_registry_says_so(tmp_path: Path) -> None:
    with (
        override_settings(SANDBOX_IMAGE_CATALOG=_catalog(tmp_path, TINY), SANDBOX_IMAGE_SOURCE="pull"),
        pytest.raises(
            ImageBuildError, match=r"cannot pull registry.invalid/lctest/tiny:1: .*SANDBOX_IMAGE_SOURCE"
        ),
    ):
        images_ensure(progress=lambda line: None)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_shell_and_the_workstation_run_as_the_student(
    client: docker.DockerClient, engine_cleanup: None
) -> None:
    results = images_ensure(names=[SHELL, WORKSTATION], progress=print)
    assert [result.action in ("built", "current") for result in results] == [True, True]
    assert build_dirs_stale(Path(settings.DATA_DIR) / "build") == []

    for name in (SHELL, WORKSTATION):
        config = client.api.inspect_image(name)["Config"]
        assert config["User"] == catalog_entry(name).user
        assert config["Cmd"] == ["bash", "-l"]
        assert "LANG=C.UTF-8" in config["Env"]

    status, output = _run(
        client,
        SHELL,
        ["bash", "-c", "id -u && command -v bash ps top vi tput less timeout >/dev/null && echo tools"],
    )
    assert (status, output) == (0, "1000\ntools\n")

    status, output = _run(
        client, WORKSTATION, ["sh", "-c", "id -u && docker --version && stat -c %U:%a /run/layercake"]
    )
    assert status == 0
    uid, version, run_dir = output.splitlines()
    assert uid == "1000"
    assert version.startswith("Docker version 26.")
    assert run_dir == "root:755"
    assert client.api.inspect_image(WORKSTATION)["Config"]["Labels"]["layercake.workstation"] == "1"
