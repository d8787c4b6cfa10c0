"""Hijacked streams, exec instances and container commands aimed at what is not the student's: another
session's containers and exec instances by name, engine name, ID or prefix, and the sandbox's own
workstation; and the restart policies that `docker update` could widen."""

from typing import Any

import pytest
from django.conf import settings

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

UPGRADE = {"Connection": "Upgrade", "Upgrade": "tcp"}


def test_another_sessions_containers_and_execs_are_not_there(student_factory: Any, curated_image: str) -> None:
    alice: StudentSession = student_factory()
    bob: StudentSession = student_factory()
    container = alice.run(curated_image, ["sleep", "600"], name="web")
    exec_id = alice.call("POST", "/v1.41/containers/web/exec", {"Cmd": ["true"], "AttachStdout": True}).json()[
        "Id"
    ]
    engine_name = f"{settings.SANDBOX_NAMESPACE}-s{alice.session_id}-web"
    workstation = f"{settings.SANDBOX_NAMESPACE}-sb-{bob.session_id}"
    for ref in (container, container[:12], "web", engine_name, workstation):
        assert bob.call("POST", f"/v1.41/containers/{ref}/attach?stream=1&stdout=1", headers=UPGRADE).status == 404
        assert bob.call("POST", f"/v1.41/containers/{ref}/exec", {"Cmd": ["id"]}).status == 404
        assert bob.call("POST", f"/v1.41/containers/{ref}/pause").status == 404
        assert bob.call("POST", f"/v1.41/containers/{ref}/kill?signal=SIGKILL").status == 404
        assert bob.call("GET", f"/v1.41/containers/{ref}/logs?stdout=1").status == 404
        assert bob.call("POST", f"/v1.41/containers/{ref}/update", {"Memory": 64 << 20}).status == 404
        assert bob.call("POST", f"/v1.41/containers/{ref}/rename?name=mine").status == 404
    for ref in (exec_id, exec_id[:12], exec_id.upper()):
        assert bob.call("GET", f"/v1.41/exec/{ref}/json").status == 404
        assert bob.call("POST", f"/v1.41/exec/{ref}/resize?h=10&w=10").status == 404
        assert bob.call("POST", f"/v1.41/exec/{ref}/start", {"Detach": True}).status == 404
    assert alice.call("GET", f"/v1.41/exec/{exec_id}/json").status == 200


def test_exec_and_update_keep_the_policy(student: StudentSession, curated_image: str) -> None:
    student.run(curated_image, ["sleep", "600"], name="app")
    privileged = student.call("POST", "/v1.41/containers/app/exec", {"Cmd": ["id"], "Privileged": True})
    assert privileged.status == 403, privileged.body
    for name in ("always", "unless-stopped"):
        widened = student.call("POST", "/v1.41/containers/app/update", {"RestartPolicy": {"Name": name}})
        assert widened.status == 403, widened.body
    many = student.call(
        "POST",
        "/v1.41/containers/app/update",
        {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 10**6}},
    )
    assert many.status == 200, many.body
    policy = student.call("GET", "/v1.41/containers/app/json").json()["HostConfig"]["RestartPolicy"]
    assert policy["Name"] == "on-failure" and policy["MaximumRetryCount"] <= 10
    for body in ({"PidsLimit": -1}, {"Memory": 1 << 40}, {"NanoCpus": 64 * 10**9}, {"CpusetCpus": "0"}):
        assert student.call("POST", "/v1.41/containers/app/update", body).status in (400, 403), body
