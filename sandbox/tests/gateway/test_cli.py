"""The curriculum's commands, typed into the workstation's docker CLI as a student types them, through the
gateway; where the output has a shape, it is compared with the same CLI straight against the engine."""

import json
import re
import secrets
import time
from typing import Any

import docker
import docker.errors
import pytest

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis, pytest.mark.slow]

DOCKERFILE = (
    "FROM {image}\nWORKDIR /app\nCOPY hello.txt .\nRUN echo built > /built\nEXPOSE 80\n"
    'CMD ["cat", "/app/hello.txt"]\n'
)


def ok(result: tuple[int, str]) -> str:
    code, output = result
    assert code == 0, output
    return output


def header(output: str) -> str:
    return re.sub(r"\s+", " ", output.splitlines()[0]).strip()


def steps(output: str) -> list[str]:
    return [
        re.sub(r"[0-9a-f]{12}", "ID", line)
        for line in output.splitlines()
        if line.startswith(("Step ", " ---> ", "Successfully"))
    ]


@pytest.fixture
def baseline_names(engine: docker.APIClient) -> Any:
    names: list[str] = []
    yield names
    for name in names:
        try:
            engine.remove_image(name, force=True)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                raise


def test_curriculum_commands_through_the_gateway(
    student: StudentSession, workstation_factory: Any, curated_image: str, baseline_names: list[str]
) -> None:
    ws = workstation_factory.for_session(student)
    base = workstation_factory.baseline()
    image = curated_image

    images = ok(ws.docker("docker images"))
    assert header(images) == header(ok(base.docker("docker images"))) == "REPOSITORY TAG IMAGE ID CREATED SIZE"
    assert image.split(":")[0] in images
    assert ok(ws.docker(f"docker run --rm {image} echo hello")) == "hello\n"
    assert ok(base.docker(f"docker run --rm {image} echo hello")) == "hello\n"
    history = ok(ws.docker(f"docker history --format '{{{{.ID}}}} {{{{.CreatedBy}}}} {{{{.Size}}}}' {image}"))
    assert history == ok(
        base.docker(f"docker history --format '{{{{.ID}}}} {{{{.CreatedBy}}}} {{{{.Size}}}}' {image}")
    )
    assert header(ok(ws.docker(f"docker history {image}"))) == "IMAGE CREATED CREATED BY SIZE COMMENT"
    pull = ok(ws.docker(f"docker pull {image}"))
    assert f"Status: Image is up to date for {image}" in pull
    # Built here, the image has no registry digest, and its ID is not one.
    assert "Digest:" not in pull

    ok(ws.docker(f"printf 'hi\\n' > hello.txt && printf '{DOCKERFILE.format(image=image)}' > Dockerfile"))
    ok(base.docker(f"printf 'hi\\n' > hello.txt && printf '{DOCKERFILE.format(image=image)}' > Dockerfile"))
    built = ok(ws.docker("docker build -t myapp . 2>/dev/null"))
    base_tag = f"lcbase-{secrets.token_hex(4)}"
    baseline_names.append(base_tag)
    base_built = ok(base.docker(f"docker build --no-cache -t {base_tag} . 2>/dev/null"))
    assert steps(built) == [line.replace(base_tag, "myapp") for line in steps(base_built)]
    assert "Successfully tagged myapp:latest" in built
    assert ok(ws.docker("docker run --rm myapp")) == "hi\n"
    history = ok(ws.docker("docker history myapp"))
    assert len(history.splitlines()) == len(ok(base.docker(f"docker history {base_tag}")).splitlines())
    assert "layercake.session" not in history

    ok(ws.docker(f"docker run -d --name web -p 8080:80 {image} sleep 600"))
    ps = ok(ws.docker("docker ps"))
    assert (
        header(ps)
        == header(ok(base.docker("docker ps")))
        == "CONTAINER ID IMAGE COMMAND CREATED STATUS PORTS NAMES"
    )
    row = ps.splitlines()[1]
    assert row.split()[1] == image and row.endswith(" web") and "0.0.0.0:8080->80/tcp" in row
    assert ok(ws.docker("docker exec web sh -c 'echo changed > /etc/motd; cat /etc/motd'")) == "changed\n"
    assert ok(ws.docker("docker exec -i web cat", stdin="piped")) == "piped"
    diff = ok(ws.docker("docker diff web"))
    assert ("C /etc" in diff and "A /etc/motd" in diff) or "C /etc/motd" in diff
    ok(ws.docker("docker pause web"))
    assert "(Paused)" in ok(ws.docker("docker ps"))
    ok(ws.docker("docker unpause web"))
    ok(ws.docker("docker stop -t 1 web"))
    assert "Exited" in ok(ws.docker("docker ps -a"))
    assert ok(ws.docker("docker ps -q")) == ""
    ok(ws.docker("docker start web"))
    assert ok(ws.docker("docker exec web cat /etc/motd")) == "changed\n"
    assert (
        ok(ws.docker("docker inspect --format '{{.Name}} {{.State.Status}} {{.Config.Image}}' web"))
        == f"/web running {image}\n"
    )
    ok(ws.docker("docker commit web snapshot"))
    assert ok(ws.docker("docker run --rm snapshot cat /etc/motd")) == "changed\n"
    ok(ws.docker("docker tag snapshot snapshot:v2"))
    tagged = ok(ws.docker("docker images snapshot"))
    ids = {line.split()[2] for line in tagged.splitlines()[1:]}
    assert len(tagged.splitlines()) == 3 and len(ids) == 1 and len(ids.pop()) == 12
    ok(ws.docker(f"docker tag {image} tools"))
    rows = ok(ws.docker("docker images tools")).splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["tools", "latest"]], "only the names that match are listed"
    ok(ws.docker("docker run --name user-of-myapp myapp"))
    refused = ws.docker("docker rmi myapp")
    assert refused[0] != 0 and "conflict" in refused[1] and "is using its referenced image" in refused[1]
    assert ok(ws.docker("docker logs user-of-myapp")) == "hi\n"

    ok(ws.docker("docker volume create data"))
    ok(ws.docker(f"docker run --rm -v data:/data {image} sh -c 'echo kept > /data/f'"))
    assert ok(ws.docker(f"docker run --rm -v data:/data {image} cat /data/f")) == "kept\n"
    assert "data" in ok(ws.docker("docker volume ls"))

    tty = ok(ws.docker(f"script -qec 'docker run -it --rm {image} sh -c tty' /dev/null"))
    assert "/dev/pts/" in tty

    # Rebuilding moves the name to a new image; the old one is left dangling, still the old container's.
    ok(ws.docker("printf 'bye\\n' > hello.txt && docker build -t myapp . >/dev/null 2>&1"))
    dangling = ok(ws.docker("docker images -q --filter dangling=true")).split()
    assert len(dangling) == 1 and len(dangling[0]) == 12
    assert ok(ws.docker("docker ps -a --filter name=user-of-myapp --format '{{.Image}}'")) == f"{dangling[0]}\n"
    assert ok(ws.docker("docker ps -a --filter name=web --format '{{.Image}}'")) == f"{image}\n"
    assert ok(ws.docker("docker start -a user-of-myapp")) == "hi\n"
    assert ok(ws.docker("docker run --rm myapp")) == "bye\n"
    refused = ws.docker(f"docker rmi {dangling[0]}")
    assert refused[0] != 0 and "image is being used by stopped container" in refused[1], refused
    ok(ws.docker("docker rm -f $(docker ps -aq)"))
    assert ok(ws.docker("docker ps -aq")) == ""
    ok(ws.docker("docker rmi snapshot:v2 snapshot"))
    ok(ws.docker("docker rmi $(docker images -q --filter dangling=true)"))
    assert ok(ws.docker("docker images -q --filter dangling=true")) == ""
    ok(ws.docker("docker image prune -f"))
    ok(ws.docker("docker container prune -f"))
    assert image.split(":")[0] in ok(ws.docker("docker images"))


def test_what_a_student_also_types_answers_as_docker_does(
    student: StudentSession, workstation_factory: Any, curated_image: str
) -> None:
    ws = workstation_factory.for_session(student)
    base = workstation_factory.baseline()
    image = curated_image

    # The CLI's last guess for an unknown name is a plugin: the answer must be docker's own.
    for workstation in (ws, base):
        code, said = workstation.docker("docker inspect nosuch-thing 2>&1 >/dev/null")
        assert (code, said) == (1, "Error: No such object: nosuch-thing\n")

    ok(ws.docker(f"docker run -d --name web -p 8080:80 {image} sleep 600"))
    ok(ws.docker(f"docker run -d --name other {image} sleep 600"))
    assert ok(ws.docker("docker ps --filter 'name=^web$' --format '{{.Names}}'")) == "web\n"
    assert ok(ws.docker("docker ps --filter publish=8080 --format '{{.Names}}'")) == "web\n"
    assert ok(ws.docker("docker ps --filter publish=8000-8090/tcp --format '{{.Names}}'")) == "web\n"
    assert ok(ws.docker("docker ps --filter publish=8081 --format '{{.Names}}'")) == ""
    assert ok(ws.docker("docker ps --filter network=nosuch --format '{{.Names}}'")) == ""
    assert sorted(ok(ws.docker("docker ps --filter network=bridge --format '{{.Names}}'")).split()) == [
        "other",
        "web",
    ]
    stats = ok(ws.docker("docker stats --no-stream --format '{{.Name}} {{.Container}}' web"))
    assert stats.split()[0] == "web" and "-s" not in stats, stats

    ok(ws.docker("docker exec -d web sh -c 'echo detached > /mark'"))
    ok(ws.docker("sleep 1"))
    assert ok(ws.docker("docker exec web cat /mark")) == "detached\n"

    # Forced by name, an image a stopped container uses loses its name and stays, as docker does.
    ok(ws.docker(f"docker tag {image} mine && docker run --name user-of-mine mine true"))
    assert ok(ws.docker("docker rmi -f mine")) == "Untagged: mine:latest\n"
    assert ok(ws.docker("docker start -a user-of-mine")) == ""
    assert image.split(":")[0] in ok(ws.docker("docker images"))
    ok(ws.docker("docker rm -f web other user-of-mine"))


def test_a_dockerfile_from_an_image_not_in_the_course_says_it_cannot_be_pulled(
    student: StudentSession, workstation_factory: Any
) -> None:
    ws = workstation_factory.for_session(student)
    ok(ws.docker("printf 'FROM alpine\\nRUN true\\n' > Dockerfile"))
    code, said = ws.docker("docker build -t mine . 2>&1")
    assert code != 0 and "pull access denied for alpine" in said and "curated images" in said, said
    assert "mine" not in ok(ws.docker("docker images"))


def test_the_steps_of_a_build_are_images_to_list_and_run(
    student_factory: Any, workstation_factory: Any, curated_image: str
) -> None:
    alice: StudentSession = student_factory()
    ws = workstation_factory.for_session(alice)
    dockerfile = f"FROM {curated_image}\\nRUN echo one > /one\\nRUN echo two > /two\\n"
    ok(ws.docker(f"printf '{dockerfile}' > Dockerfile && docker build -t steps . >/dev/null 2>&1"))
    ids = ok(ws.docker("docker history -q steps")).split()
    step = ids[1]
    assert len(step) == 12 and step != "<missing>", ids
    assert step not in ok(ws.docker("docker images -q")).split()
    assert step in ok(ws.docker("docker images -a -q")).split()
    ran = ok(ws.docker(f"docker run --rm {step} sh -c 'cat /one; test -e /two || echo no two'"))
    assert ran == "one\nno two\n"
    code, said = ws.docker(f"docker rmi {step}")
    assert code != 0 and "image has dependent child images" in said, said
    assert "steps" in ok(ws.docker("docker images"))

    bob: StudentSession = student_factory()
    assert bob.call("GET", f"/images/{step}/json").status == 404
    assert step not in {i["Id"][7:19] for i in bob.call("GET", "/images/json?all=1").json()}


def test_events_filtered_by_image_as_the_student_names_it(
    student: StudentSession, workstation_factory: Any, curated_image: str
) -> None:
    ws = workstation_factory.for_session(student)
    since = ok(ws.docker("date +%s")).strip()
    ok(ws.docker(f"docker run --name from-curated {curated_image} true"))
    ok(ws.docker("docker commit from-curated mine && docker run --name from-mine mine true"))
    ok(ws.docker("docker tag mine mine:v2"))
    until = int(ok(ws.docker("date +%s")).strip()) + 1
    fields = "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}"

    def events(image: str) -> str:
        command = f"docker events --since {since} --until {until} --filter image={image} --format '{fields}'"
        return ok(ws.docker(command))

    curated = events(curated_image)
    assert "container start from-curated" in curated and "from-mine" not in curated, curated
    mine = events("mine")
    assert "container start from-mine" in mine and "from-curated" not in mine, mine
    assert "image tag mine:v2" in mine, mine
    assert events("nosuch") == ""


def test_refusals_name_the_container_as_the_student_typed_it(
    student: StudentSession, workstation_factory: Any, curated_image: str
) -> None:
    ws = workstation_factory.for_session(student)
    base = workstation_factory.baseline()
    for workstation in (ws, base):
        code, said = workstation.docker("docker kill nosuch-box 2>&1")
        assert (code, said) == (
            1,
            "Error response from daemon: Cannot kill container: nosuch-box: No such container: nosuch-box\n",
        )
    ok(ws.docker(f"docker create --name idle {curated_image} sleep 60"))
    said = ws.docker("docker kill idle 2>&1")[1]
    assert said.startswith(
        "Error response from daemon: Cannot kill container: idle: Container "
    ) and said.endswith(" is not running\n"), said
    ok(ws.docker("docker start idle && docker pause idle"))
    said = ws.docker("docker exec idle true 2>&1")[1]
    assert said == "Error response from daemon: Container idle is paused, unpause the container before exec\n", (
        said
    )
    ok(ws.docker("docker rm -f idle"))


def test_system_df_counts_shared_layers_once(
    student: StudentSession, workstation_factory: Any, curated_image: str
) -> None:
    ws = workstation_factory.for_session(student)
    base = workstation_factory.baseline()
    ok(ws.docker(f"printf 'FROM {curated_image}\\nRUN echo added > /added\\n' > Dockerfile"))
    ok(ws.docker("docker build -t mysite . >/dev/null 2>&1 && docker run --name user mysite true"))
    ok(ws.docker("docker volume create notes"))
    summary = ok(ws.docker("docker system df"))
    # The engine runs one docker system df at a time: another test run's gateway may be asking it too.
    for _ in range(20):
        code, straight = base.docker("docker system df")
        if "a disk usage operation is already running" not in straight:
            break
        time.sleep(0.5)
    assert header(summary) == header(ok((code, straight))) == "TYPE TOTAL ACTIVE SIZE RECLAIMABLE"
    rows = {line.split()[0]: line.split()[1:3] for line in summary.splitlines()[1:]}
    images = ok(ws.docker("docker images -q")).split()
    assert rows["Images"] == [str(len(images)), "1"] and rows["Containers"] == ["1", "0"], summary
    assert rows["Local"] == ["Volumes", "1"], summary
    detail = ok(ws.docker("docker system df -v --format '{{json .Images}}'"))
    by_name = {f"{i['Repository']}:{i['Tag']}": i for i in json.loads(detail)}
    mine, curated = by_name["mysite:latest"], by_name[curated_image]
    # mysite is the curated image's layers and one small layer of its own: only that one is its alone.
    assert mine["SharedSize"] == curated["SharedSize"] and curated["UniqueSize"] == "0B", (mine, curated)
    assert mine["UniqueSize"] == "6B" and mine["Containers"] == "1", mine  # "added\n"
    total = ok(ws.docker("docker system df --format '{{.Type}} {{.Size}}'")).splitlines()[0]
    sizes = ok(ws.docker("docker system df -v --format '{{range .Images}}{{.Size}} {{end}}'"))
    assert total.startswith("Images ") and len(sizes.split()) == len(images), (total, sizes)
    assert "-s" not in detail and "layercake" not in detail.replace("layercake/", ""), detail
    volumes = json.loads(ok(ws.docker("docker system df -v --format '{{json .Volumes}}'")))
    assert [(v["Name"], v["Size"]) for v in volumes] == [("notes", "0B")], volumes


def test_docker_cp_says_it_is_not_available(
    student: StudentSession, workstation_factory: Any, curated_image: str
) -> None:
    ws = workstation_factory.for_session(student)
    ok(ws.docker(f"docker run -d --name web {curated_image} sleep 60 && echo hi > toc.txt"))
    for command in ("docker cp toc.txt web:/toc.txt", "docker cp toc.txt web:/etc/", "docker cp web:/etc/hosts ."):
        code, said = ws.docker(f"{command} 2>&1")
        assert (
            code == 1
            and said == "Error response from daemon: docker cp is not available in the Layercake sandbox\n"
        ), (
            command,
            said,
        )
    code, said = ws.docker("docker cp toc.txt web:/nowhere/ 2>&1")
    assert code == 1 and "no such directory" in said, said
