"""A student reading more than their own containers through the commands that look into one: docker top runs
ps on the host over every process, and only its PID column keeps the host's processes out."""

import json
import time
from typing import Any
from urllib.parse import quote

import pytest

from .conftest import StudentSession

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]


def _top(student: StudentSession, container: str, ps_args: str = "") -> Any:
    query = f"?ps_args={quote(ps_args)}" if ps_args else ""
    return student.call("GET", f"/v1.41/containers/{container}/top{query}")


def test_top_shows_only_the_containers_processes_whatever_the_ps_options(
    student: StudentSession, curated_image: str
) -> None:
    # The shell names itself "a <its own host PID>": a row of two words where ps prints one, so that a column
    # renamed PID reads that PID for this row and "-" for every host process after it.
    script = (
        "until [ -s /pid ]; do sleep 0.1; done; "
        'printf "a %s" "$(cat /pid)" > /proc/$$/comm; touch /named; while :; do sleep 600; done'
    )
    container = student.run(curated_image, ["sh", "-c", script])
    listed = _top(student, container)
    assert listed.status == 200, listed.body
    pids = {row[listed.json()["Titles"].index("PID")] for row in listed.json()["Processes"]}
    host_pid = min(pids, key=int)
    exec_id = student.call(
        "POST",
        f"/v1.41/containers/{container}/exec",
        {"Cmd": ["sh", "-c", f"echo {host_pid} > /pid; until [ -f /named ]; do sleep 0.1; done"]},
    ).json()["Id"]
    student.call("POST", f"/v1.41/exec/{exec_id}/start", {"Detach": True, "Tty": False})
    deadline = time.monotonic() + 10
    while student.call("GET", f"/v1.41/exec/{exec_id}/json").json()["Running"] and time.monotonic() < deadline:
        time.sleep(0.1)

    for attack in (
        "-ocomm=A,rtprio=PID,pid,args -e --sort=-pid",
        "-o lstart,comm,rtprio,rtprio,rtprio,rtprio,pid,args -e",
        "-e -o comm,rtprio,pid,args",
        "-e -o pid,lstart,args",
        "-eZ",
        "-e -o pid:20,args",
    ):
        answer = _top(student, container, attack)
        if answer.status == 200:
            body = json.dumps(answer.json())
            assert "manage.py gateway" not in body and "dockerd" not in body, attack
            assert len(answer.json()["Processes"]) <= 3, attack
        else:
            assert answer.status in (400, 403, 500), (attack, answer.body)

    for ordinary in ("-ef", "aux", "-o pid,comm", "-eo pid,ppid,user,args", "-efL", "-e -o pid,stat,etime,cmd"):
        answer = _top(student, container, ordinary)
        assert answer.status == 200, (ordinary, answer.body)
        assert any("sleep" in " ".join(row) for row in answer.json()["Processes"]), ordinary
