"""The gateway's HTTP: version negotiation, default deny, strict parsing and keep-alive, on a real socket."""

import contextlib
import json
import socket
import stat
from urllib.parse import quote

import pytest

from sandbox.gateway.http import Request

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def test_ping_answers_what_the_cli_negotiates_with(student: StudentSession) -> None:
    answer = student.call("GET", "/_ping")
    assert answer.status == 200 and answer.body == b"OK"
    assert answer.headers["api-version"] == "1.41"
    assert answer.headers["ostype"] == "linux"
    assert student.call("HEAD", "/_ping").status == 200


def test_socket_is_the_only_thing_in_the_directory_and_uid_1000_can_connect(student: StudentSession) -> None:
    assert [p.name for p in student.directory.iterdir()] == ["docker.sock"]
    info = student.socket.stat()
    assert stat.S_ISSOCK(info.st_mode) and info.st_uid == 1000 and info.st_mode & 0o600 == 0o600
    assert student.directory.stat().st_mode & 0o755 == 0o755


def test_the_socket_name_a_client_reads_holds_no_host_path(student: StudentSession) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(student.socket))
        peer = sock.getpeername()
    assert str(student.directory) not in peer and "docker.sock" in peer, peer


def test_versioned_and_unversioned_paths(student: StudentSession) -> None:
    assert student.call("GET", "/version").json()["ApiVersion"] == "1.41"
    assert student.call("GET", "/v1.41/version").status == 200
    assert student.call("GET", "/v1.40/containers/json").status == 200
    too_new = student.call("GET", "/v1.45/version")
    assert too_new.status == 400 and "too new" in too_new.message
    too_old = student.call("POST", "/v1.23/containers/x/start", {"Privileged": True})
    assert too_old.status == 400 and "too old" in too_old.message


@pytest.mark.parametrize(
    ("method", "path", "feature"),
    [
        ("GET", "/v1.41/swarm", "Swarm"),
        ("GET", "/v1.41/services", "docker service (Swarm mode)"),
        ("GET", "/v1.41/plugins", "plugin"),
        ("POST", "/v1.41/auth", "docker login"),
        ("GET", "/v1.41/containers/abc/archive?path=/", "docker cp"),
        ("GET", "/v1.41/containers/abc/export", "docker export"),
        ("POST", "/v1.41/images/busybox/push", "docker push"),
        ("POST", "/v1.41/networks/create", "docker network create"),
        ("POST", "/v1.41/networks/prune", "prune"),
        ("POST", "/v1.41/session", "BuildKit"),
        ("POST", "/v1.41/images/load", "docker load"),
        ("GET", "/v1.41/nonsense", "not available"),
    ],
)
def test_default_deny(student: StudentSession, method: str, path: str, feature: str) -> None:
    answer = student.call(method, path)
    assert answer.status == 403
    assert feature in answer.message and "not available in the Layercake sandbox" in answer.message


def test_duplicate_keys_are_refused_also_by_case(student: StudentSession, curated_image: str) -> None:
    for body in (
        b'{"Image": "%s", "Image": "x"}' % curated_image.encode(),
        b'{"Image": "%s", "HostConfig": {}, "hostconfig": {"Privileged": true}}' % curated_image.encode(),
        b'{"Image": "%s", "HostConfig": {"Privileged": false, "privileged": true}}' % curated_image.encode(),
    ):
        answer = student.call(
            "POST", "/v1.41/containers/create", body=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status == 400 and "duplicate key" in answer.message
    assert student.call("GET", "/containers/json?all=1").json() == []


def test_a_case_variant_key_is_read_as_go_reads_it(student: StudentSession, curated_image: str) -> None:
    answer = student.call(
        "POST", "/containers/create", {"image": curated_image, "hostconfig": {"privileged": True}}
    )
    assert answer.status == 403 and "--privileged" in answer.message
    answer = student.call(
        "POST", "/containers/create", {"Image": curated_image, "HostConfig": {"\u017frivileged": True}}
    )
    assert answer.status == 400


def test_json_nested_past_any_docker_body_is_refused_and_the_connection_goes_on(
    student: StudentSession, curated_image: str
) -> None:
    nested = b'{"Image": "%s", "Labels": {"a": "b"}, "Env": %s}'
    good = json.dumps({"Image": curated_image, "Cmd": ["true"]}).encode()
    head = b"POST /containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
    # Deeper than the interpreter's own stack, and deep enough only to make the policy's walk through it recurse.
    for depth in (100_000, 900):
        body = nested % (curated_image.encode(), b"[" * depth + b"]" * depth)
        request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        request += head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(good) + good
        answer = student.raw(request)
        assert answer.startswith(b"HTTP/1.1 400") and b"nested more than 64 levels deep" in answer, answer[:300]
        assert b"HTTP/1.1 201" in answer
    deep_filter = "[" * 20_000 + "]" * 20_000
    refused = student.call("GET", f"/containers/json?filters={deep_filter}")
    assert refused.status == 400 and "invalid filters: nested more than 64 levels deep" in refused.message
    assert len(student.call("GET", "/containers/json?all=1").json()) == 2
    # A commit's VOLUME change, read as JSON or as words as the engine reads it.
    container = student.call("GET", "/containers/json?all=1").json()[0]["Id"]
    change = quote("VOLUME " + "[" * 10_000)
    committed = student.call("POST", f"/commit?container={container}&changes={change}")
    assert committed.status < 500 and committed.headers["content-type"] == "application/json", committed.body[:200]


def test_a_flag_is_read_as_the_engine_reads_it() -> None:
    def flag(value: str) -> bool:
        request = Request("POST", "/build", "/build", [("nocache", value)], {}, upgrade=False)
        return request.flag("nocache")

    assert [flag(v) for v in ("1", "true", "True", "yes", "2", "on")] == [True] * 6
    assert [flag(v) for v in ("0", "false", "FALSE", "no", "none", " 0 ", "None")] == [False] * 7


def test_chunked_body_is_read_whole(student: StudentSession, curated_image: str) -> None:
    body = json.dumps({"Image": curated_image, "Cmd": ["true"]}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
    request = (
        b"POST /v1.41/containers/create?name=chunky HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    answer = student.raw(request)
    assert answer.startswith(b"HTTP/1.1 201"), answer
    names = [c["Names"] for c in student.call("GET", "/containers/json?all=1").json()]
    assert names == [["/chunky"]]


def test_ambiguous_framing_is_refused_and_nothing_runs(student: StudentSession, curated_image: str) -> None:
    body = json.dumps({"Image": curated_image}).encode()
    request = (
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), len(body), body)
    )
    answer = student.raw(request)
    assert answer.startswith(b"HTTP/1.1 400")
    assert student.call("GET", "/containers/json?all=1").json() == []


def test_smuggled_request_in_a_body_is_not_a_request(student: StudentSession, curated_image: str) -> None:
    hidden = (
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
        b"Content-Length: 60\r\n\r\n"
        + json.dumps({"Image": curated_image, "HostConfig": {"Privileged": True}}).encode()
    )
    request = b"POST /v1.41/containers/json HTTP/1.1\r\nHost: docker\r\nContent-Length: %d\r\n\r\n%s" % (
        len(hidden),
        hidden,
    )
    request += b"GET /v1.41/swarm HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
    answer = student.raw(request)
    assert answer.count(b"HTTP/1.1 403") == 2, answer
    assert student.call("GET", "/containers/json?all=1").json() == []


def test_each_request_on_a_keep_alive_connection_is_judged_on_its_own(
    student: StudentSession, curated_image: str
) -> None:
    good = json.dumps({"Image": curated_image, "Cmd": ["true"]}).encode()
    bad = json.dumps({"Image": curated_image, "HostConfig": {"CapAdd": ["SYS_ADMIN"]}}).encode()
    head = b"POST /containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n"
    request = head % len(good) + b"\r\n" + good + head % len(bad) + b"Connection: close\r\n\r\n" + bad
    answer = student.raw(request)
    assert answer.startswith(b"HTTP/1.1 201") and b"HTTP/1.1 403" in answer and b"--cap-add" in answer
    assert len(student.call("GET", "/containers/json?all=1").json()) == 1


def test_body_over_the_cap_is_refused(student: StudentSession) -> None:
    body = b"[" + b"1," * 700_000 + b"1]"
    head = b"POST /containers/create HTTP/1.1\r\nHost: docker\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(student.socket))
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(head + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def test_a_refused_head_request_is_answered_and_the_connection_goes_on(
    student: StudentSession, curated_image: str
) -> None:
    """A refusal of HEAD is a head without a body, and the next request on the connection is served."""
    student.run(curated_image, ["sleep", "60"], name="web")
    data = student.raw(
        b"HEAD /v1.41/containers/web/export HTTP/1.1\r\nHost: docker\r\n\r\n"
        b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403") and b"Content-Length: " in head
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"OK"), data
