"""Gateway overhead: docker ps, docker images and docker run --rm IMAGE true through a session's gateway
socket vs the engine's own socket, as ratios measured in one run; then the gateway's memory with 100 idle
sessions connected.

    .venv/bin/python bench/gateway.py [--image busybox:latest] [--rounds 10] [--crowd 0]

`--crowd N` first gives the engine N images of other students (as a workshop's engine holds), so that the
figures show what the gateway pays for images that are not the student's.

Runs the students' own docker CLI, taken from the workstation image through the engine's API, on this
machine; needs the engine and the Redis of settings.REDIS_URL. It starts its own gateway process in a
namespace of its own and removes everything it made.
"""

import argparse
import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
NAMESPACE = f"lcbench{os.getpid()}"
os.environ["LAYERCAKE_SANDBOX_NAMESPACE"] = NAMESPACE
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tutorial.settings.local")


def workstation_cli(api: Any, directory: Path) -> str:
    """The workstation image's docker CLI, copied out of a created (never started) container."""
    container = api.create_container(
        "layercake/workstation:latest",
        command=["true"],
        labels={"layercake.managed": "1", "layercake.namespace": NAMESPACE},
    )
    try:
        stream, _ = api.get_archive(container["Id"], "/usr/bin/docker")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            archive.extract("docker", directory, filter="data")
    finally:
        api.remove_container(container["Id"], force=True)
    path = directory / "docker"
    path.chmod(0o755)
    return str(path)


def crowd(api: Any, image: str, count: int) -> list[str]:
    """`count` images, each committed from a created container under another session's labels."""
    container = api.create_container(
        image, command=["true"], labels={"layercake.managed": "1", "layercake.namespace": NAMESPACE}
    )
    made: list[str] = []
    try:
        for number in range(count):
            labels = {
                "layercake.managed": "1",
                "layercake.namespace": NAMESPACE,
                "layercake.session": str(4_000_000_000 + number),
                "layercake.role": "student-image",
            }
            committed = api.commit(
                container["Id"], repository=f"{NAMESPACE}-s{4_000_000_000 + number}/app", conf={"Labels": labels}
            )
            made.append(committed["Id"])
    finally:
        api.remove_container(container["Id"], force=True)
    return made


def run_once(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def paired(
    direct: tuple[list[str], dict[str, str]], through: tuple[list[str], dict[str, str]], rounds: int
) -> tuple[float, float]:
    """Medians of the two sides, sampled in turn so that a change in the machine's load hits both alike."""
    run_once(*through)
    firsts, seconds = [], []
    for _ in range(rounds):
        firsts.append(run_once(*direct))
        seconds.append(run_once(*through))
    return statistics.median(firsts), statistics.median(seconds)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="busybox:latest")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--idle-sessions", type=int, default=100)
    parser.add_argument("--crowd", type=int, default=0)
    options = parser.parse_args()

    import django

    django.setup()
    import docker
    from django.conf import settings

    from sandbox.gateway.client import gateway_session_close, gateway_session_open, gateway_session_purge

    api = docker.APIClient(base_url=settings.SANDBOX_DOCKER_URL)
    gateway = subprocess.Popen(
        [sys.executable, "manage.py", "gateway"],
        cwd=BASE_DIR,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sessions: list[int] = []
    held: list[socket.socket] = []
    crowded: list[str] = []
    scratch = tempfile.mkdtemp(prefix="layercake-bench-")
    try:
        time.sleep(1.5)

        def open_session(*, network: bool) -> Path:
            session_id = 3_000_000_000 + secrets.randbelow(100_000_000)
            if network:
                labels = {"layercake.managed": "1", "layercake.namespace": NAMESPACE}
                api.create_network(f"{NAMESPACE}-sb-{session_id}", internal=True, labels=labels)
            sessions.append(session_id)
            return gateway_session_open(
                session_id=session_id,
                owner_key="bench",
                expires_at=int(time.time()) + 3600,
                memory_budget_mb=512,
                max_containers=8,
                disk_budget_mb=1024,
            )

        directory = open_session(network=True)
        engine_env = {**os.environ, "DOCKER_HOST": settings.SANDBOX_DOCKER_URL}
        gateway_env = {**os.environ, "DOCKER_HOST": f"unix://{directory / 'docker.sock'}"}
        cli = workstation_cli(api, Path(scratch))
        commands = {
            "docker ps": [cli, "ps"],
            "docker images": [cli, "images"],
            f"docker run --rm {options.image} true": [cli, "run", "--rm", options.image, "true"],
        }
        crowded = crowd(api, options.image, options.crowd)
        print(
            f"median of {options.rounds} runs each, same machine, same run, {options.crowd} other students' images"
        )
        medians: dict[str, float] = {}
        for label, command in commands.items():
            direct, through = paired((command, engine_env), (command, gateway_env), options.rounds)
            medians[label] = direct
            print(
                f"{label:40s} engine {direct * 1000:7.1f} ms  gateway {through * 1000:7.1f} ms  "
                f"ratio {through / direct:.2f}x"
            )
        # The gateway puts every student container on the student's own network, and starting a container on
        # a user-defined network costs the engine more than on its default bridge: the same run straight on
        # the engine, on that network, separates the policy's cost from the gateway's own.
        network = f"{NAMESPACE}-sb-{sessions[0]}"
        same = [cli, "run", "--rm", "--network", network, "--label", f"layercake.namespace={NAMESPACE}"]
        direct, through = paired(
            ([*same, options.image, "true"], engine_env),
            (commands[f"docker run --rm {options.image} true"], gateway_env),
            options.rounds,
        )
        label = "  the same, engine on the student network"
        print(
            f"{label:40s} engine {direct * 1000:7.1f} ms  gateway {through * 1000:7.1f} ms  "
            f"ratio {through / direct:.2f}x"
        )
        bridge = medians[f"docker run --rm {options.image} true"]
        print(
            f"  a gateway that cost nothing would measure {direct / bridge:.2f}x: the engine alone takes "
            f"{direct * 1000:.1f} ms on the student network, {bridge * 1000:.1f} ms on its default bridge"
        )

        before = rss_kib(gateway.pid)
        for _ in range(options.idle_sessions - 1):
            open_session(network=False)
        for session_id in sessions:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(Path(settings.GATEWAY_DIR) / str(session_id) / "docker.sock"))
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            sock.recv(1024)
            held.append(sock)
        time.sleep(1)
        after = rss_kib(gateway.pid)
        print(
            f"gateway RSS: {before / 1024:.1f} MiB with 1 session, {after / 1024:.1f} MiB with "
            f"{len(sessions)} sessions each holding an idle keep-alive connection"
        )
    finally:
        for image_id in crowded:
            with contextlib.suppress(docker.errors.APIError):
                api.remove_image(image_id, force=True)
        for sock in held:
            sock.close()
        for session_id in sessions:
            gateway_session_purge(session_id=session_id)
            gateway_session_close(session_id=session_id)
            with contextlib.suppress(docker.errors.APIError):
                api.remove_network(f"{NAMESPACE}-sb-{session_id}")
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=10)
        shutil.rmtree(Path(settings.GATEWAY_DIR), ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        api.close()


if __name__ == "__main__":
    main()
