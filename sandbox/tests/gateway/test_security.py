"""Known escapes and sandbox-policy bypasses, each refused with a clear message and leaving nothing behind."""

import json
from typing import Any
from urllib.parse import quote

import docker
import pytest

from .conftest import StudentSession, dockerfile_context, owned_objects

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _create(student: StudentSession, image: str, **fields: Any) -> Any:
    return student.call("POST", "/v1.41/containers/create", {"Image": image, "Cmd": ["true"], **fields})


ESCAPES = [
    ({"HostConfig": {"Privileged": True}}, "--privileged"),
    ({"HostConfig": {"CapAdd": ["SYS_ADMIN"]}}, "--cap-add"),
    ({"HostConfig": {"Binds": ["/:/host"]}}, "host path"),
    ({"HostConfig": {"Binds": ["/var/run/docker.sock:/var/run/docker.sock"]}}, "host path"),
    ({"HostConfig": {"Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}}, "host path"),
    (
        {
            "HostConfig": {
                "Mounts": [
                    {
                        "Type": "volume",
                        "Source": "x",
                        "Target": "/x",
                        "VolumeOptions": {
                            "DriverConfig": {
                                "Name": "local",
                                "Options": {"type": "none", "o": "bind", "device": "/"},
                            }
                        },
                    }
                ]
            }
        },
        "volume driver options",
    ),
    ({"HostConfig": {"VolumeDriver": "local"}}, "--volume-driver"),
    ({"HostConfig": {"Mounts": [{"Type": "tmpfs", "Target": "/t"}]}}, "type=tmpfs"),
    ({"HostConfig": {"Devices": [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda"}]}}, "--device"),
    ({"HostConfig": {"DeviceCgroupRules": ["a *:* rwm"]}}, "--device-cgroup-rule"),
    ({"HostConfig": {"PidMode": "host"}}, "--pid"),
    ({"HostConfig": {"IpcMode": "host"}}, "--ipc"),
    ({"HostConfig": {"UTSMode": "host"}}, "--uts"),
    ({"HostConfig": {"UsernsMode": "host"}}, "--userns"),
    ({"HostConfig": {"NetworkMode": "host"}}, "--network host"),
    (
        {"HostConfig": {"NetworkMode": "bridge"}, "NetworkingConfig": {"EndpointsConfig": {"host": {}}}},
        "--network host",
    ),
    ({"HostConfig": {"CgroupnsMode": "host"}}, "--cgroupns"),
    ({"HostConfig": {"SecurityOpt": ["seccomp=unconfined"]}}, "--security-opt"),
    ({"HostConfig": {"SecurityOpt": ["apparmor=unconfined"]}}, "--security-opt"),
    ({"HostConfig": {"SecurityOpt": ["label=disable"]}}, "--security-opt"),
    ({"HostConfig": {"MaskedPaths": []}}, "masked"),
    ({"HostConfig": {"ReadonlyPaths": []}}, "masked"),
    ({"HostConfig": {"Runtime": "runsc"}}, "--runtime"),
    (
        {"HostConfig": {"LogConfig": {"Type": "syslog", "Config": {"syslog-address": "udp://127.0.0.1:514"}}}},
        "log driver",
    ),
    ({"HostConfig": {"CgroupParent": "/"}}, "--cgroup-parent"),
    ({"HostConfig": {"Sysctls": {"kernel.shm_rmid_forced": "1"}}}, "--sysctl"),
    ({"HostConfig": {"Ulimits": [{"Name": "nofile", "Soft": 1048576, "Hard": 1048576}]}}, "--ulimit"),
    ({"HostConfig": {"PortBindings": {"80/tcp": [{"HostIp": "10.0.0.1", "HostPort": "80"}]}}}, "publishing on"),
    ({"HostConfig": {"PublishAllPorts": True}}, "-P"),
    ({"HostConfig": {"Memory": 64 * 1024**3}}, "at most"),
    ({"HostConfig": {"NanoCpus": 64 * 10**9}}, "at most"),
    ({"HostConfig": {"OomKillDisable": True}}, "--oom-kill-disable"),
    ({"HostConfig": {"CpusetCpus": "0"}}, "--cpuset-cpus"),
    ({"HostConfig": {"BlkioWeight": 500}}, "--blkio-weight"),
    ({"HostConfig": {"RestartPolicy": {"Name": "always"}}}, "--restart always"),
    ({"HostConfig": {"ExtraHosts": ["x:127.0.0.1"]}}, "--add-host"),
    ({"HostConfig": {"Dns": ["127.0.0.1"]}}, "--dns"),
    ({"HostConfig": {"Whatever": "x"}}, "HostConfig.Whatever"),
    ({"Labels": {"layercake.session": "1"}}, "reserved"),
]


@pytest.mark.parametrize(("fields", "said"), ESCAPES, ids=[said for _fields, said in ESCAPES])
def test_container_escapes_are_refused(
    student: StudentSession, curated_image: str, engine: docker.APIClient, fields: dict[str, Any], said: str
) -> None:
    answer = _create(student, curated_image, **fields)
    assert answer.status in (400, 403), answer.body
    assert said in answer.message
    assert owned_objects(engine, student) == {"containers": [], "images": [], "volumes": []}


def test_created_container_carries_the_forced_policy(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    answer = _create(student, curated_image, HostConfig={"CapDrop": ["CHOWN"], "PidsLimit": -1})
    detail = engine.inspect_container(answer.json()["Id"])
    host = detail["HostConfig"]
    assert host["Privileged"] is False and host["CapAdd"] is None
    assert set(host["CapDrop"]) >= {"CHOWN", "NET_RAW", "MKNOD"}
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["NetworkMode"] == student.network
    assert 0 < host["Memory"] == host["MemorySwap"] and 0 < host["PidsLimit"] <= 128 and host["NanoCpus"] > 0
    assert host["PortBindings"] in (None, {}) and host["LogConfig"]["Type"] == "local"
    assert detail["Config"]["Labels"]["layercake.session"] == str(student.session_id)
    assert detail["Config"]["Labels"]["layercake.role"] == "student"


def test_budget_caps_count_and_memory_and_update_cannot_raise_it(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    student = student_factory(memory_budget_mb=128, max_containers=2)
    first = _create(student, curated_image, HostConfig={"Memory": 100 * 1024 * 1024})
    assert first.status == 201
    over_memory = _create(student, curated_image, HostConfig={"Memory": 64 * 1024 * 1024})
    assert over_memory.status == 403 and "in total" in over_memory.message
    second = _create(student, curated_image, HostConfig={"Memory": 16 * 1024 * 1024})
    assert second.status == 201
    over_count = _create(student, curated_image)
    assert over_count.status == 403 and "at most 2 containers" in over_count.message
    raise_memory = student.call(
        "POST", f"/containers/{second.json()['Id']}/update", {"Memory": 100 * 1024 * 1024, "MemorySwap": -1}
    )
    assert raise_memory.status == 403 and "in total" in raise_memory.message
    raise_pids = student.call("POST", f"/containers/{second.json()['Id']}/update", {"PidsLimit": 100000})
    assert raise_pids.status == 403
    assert engine.inspect_container(second.json()["Id"])["HostConfig"]["Memory"] == 16 * 1024 * 1024


def test_exec_cannot_be_privileged(student: StudentSession, curated_image: str) -> None:
    container = student.run(curated_image, ["sleep", "60"])
    answer = student.call("POST", f"/containers/{container}/exec", {"Cmd": ["id"], "Privileged": True})
    assert answer.status == 403 and "--privileged" in answer.message


@pytest.mark.parametrize(
    ("query", "dockerfile", "said"),
    [
        ("networkmode=host", "FROM {image}\n", "--network host"),
        ("remote=https%3A%2F%2F127.0.0.1%2Fctx.tar", "FROM {image}\n", "remote context"),
        ("version=2", "FROM {image}\n", "BuildKit"),
        ("cgroupparent=%2F", "FROM {image}\n", "--cgroup-parent"),
        ("extrahosts=x%3A127.0.0.1", "FROM {image}\n", "--add-host"),
        ("", "FROM {image}\nADD http://127.0.0.1:6391/ /x\n", "ADD of a URL"),
        ("", 'FROM {image}\nADD ["https://127.0.0.1/x", "/x"]\n', "ADD of a URL"),
        ("", "FROM {image}\nARG U=http://127.0.0.1/\nADD $U /x\n", "ADD of a URL"),
        ("", "FROM {image}\nONBUILD ADD http://127.0.0.1/ /x\n", "ONBUILD"),
        ("", "ARG B={image}\nFROM $B\n", "variable in FROM"),
        ("", "FROM {image}\nLABEL layercake.catalog=x\n", "reserved"),
        ("t=busybox-of-the-course", "FROM {image}\n", None),
    ],
)
def test_build_escapes_are_refused(
    student: StudentSession,
    curated_image: str,
    engine: docker.APIClient,
    query: str,
    dockerfile: str,
    said: str | None,
) -> None:
    if said is None:
        query = f"t={curated_image}"
        said = "curated images"
    answer = student.call(
        "POST",
        f"/v1.41/build?{query}",
        body=dockerfile_context(dockerfile.format(image=curated_image)),
        headers={"Content-Type": "application/x-tar"},
    )
    assert answer.status in (400, 403), answer.body
    assert said in answer.message
    assert owned_objects(engine, student)["images"] == []


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/images/create?fromImage=quay.io%2Fx%2Fy&tag=latest", "pulling from quay.io"),
        ("/images/create?fromImage=127.0.0.1%3A5000%2Fy&tag=latest", "pulling from 127.0.0.1:5000"),
        ("/images/create?fromImage=nothere&tag=latest", "curated images can be pulled"),
        ("/images/create?fromSrc=http%3A%2F%2F127.0.0.1%2Fx.tar&repo=x", "docker import"),
    ],
)
def test_pulls_from_anywhere_else_are_refused(student: StudentSession, path: str, said: str) -> None:
    answer = student.call("POST", "/v1.41" + path)
    assert answer.status in (403, 404) and said in answer.message


def test_curated_images_cannot_be_overwritten_untagged_or_removed(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    before = engine.inspect_image(curated_image)["Id"]
    container = student.run(curated_image, ["true"])
    repo, tag = curated_image.rsplit(":", 1)
    commit = student.call("POST", f"/v1.41/commit?container={container}&repo={repo}&tag={tag}")
    assert commit.status == 403 and "curated" in commit.message
    retag = student.call("POST", f"/v1.41/images/{container[:0]}{before}/tag?repo={repo}&tag={tag}")
    assert retag.status == 403
    for ref in (curated_image, before, before.removeprefix("sha256:")[:12]):
        answer = student.call("DELETE", f"/v1.41/images/{ref}?force=1")
        assert answer.status == 409 and "curated" in answer.message, answer.body
    own_tag = student.call("POST", f"/v1.41/images/{curated_image}/tag?repo=mine&tag=latest")
    assert own_tag.status == 201
    assert student.call("DELETE", "/v1.41/images/mine:latest").json() == [{"Untagged": "mine:latest"}]
    assert engine.inspect_image(curated_image)["Id"] == before
    assert curated_image in engine.inspect_image(curated_image)["RepoTags"]


def test_prune_touches_only_the_students_own(
    student_factory: Any, curated_image: str, engine: docker.APIClient
) -> None:
    one, other = student_factory(), student_factory()
    one.run(curated_image, ["true"], name="done")
    kept = other.run(curated_image, ["true"], name="done")
    engine.wait(kept, timeout=30)
    pruned = one.call("POST", "/v1.41/containers/prune")
    assert pruned.status == 200 and len(pruned.json()["ContainersDeleted"]) == 1
    assert other.call("GET", "/containers/json?all=1").json()[0]["Id"] == kept
    assert (
        one.call("POST", "/v1.41/images/prune?filters=" + quote(json.dumps({"dangling": ["false"]}))).status == 200
    )
    engine.inspect_image(curated_image)
    assert one.call("POST", "/v1.41/networks/prune").status == 403


def test_anonymous_volumes_go_with_their_containers(
    student: StudentSession, curated_image: str, engine: docker.APIClient
) -> None:
    """They carry no label, so a volume left behind would be found by nothing; docker rm (without -v) and
    docker container prune both take them, and the student's own named volume stays."""
    volumes = []
    for name in ("pruned", "removed"):
        container = student.run(curated_image, ["true"], name=name, Volumes={"/data": {}})
        assert student.call("POST", f"/v1.41/containers/{container}/wait").status == 200
        mounts = engine.inspect_container(container)["Mounts"]
        assert [m["Type"] for m in mounts] == ["volume"]
        volumes.append(mounts[0]["Name"])
    kept = student.run(curated_image, ["true"], name="kept", HostConfig={"Binds": ["notes:/notes"]})
    assert student.call("POST", f"/v1.41/containers/{kept}/wait").status == 200
    assert student.call("DELETE", "/v1.41/containers/removed").status == 204
    pruned = student.call("POST", "/v1.41/containers/prune")
    assert pruned.status == 200 and len(pruned.json()["ContainersDeleted"]) == 2, pruned.body
    for volume in volumes:
        with pytest.raises(docker.errors.NotFound):
            engine.inspect_volume(volume)
    assert [v["Name"] for v in student.call("GET", "/v1.41/volumes").json()["Volumes"]] == ["notes"]
