"""The disk watch's cost to the engine: how long one look at what every sandbox keeps on the disk takes,
against one docker system df of the whole engine (what a look cost before it sized only what may change).

    .venv/bin/python bench/disk.py [--sandboxes 4] [--rounds 5] [--socket /var/run/docker.sock]

Each sandbox gets what a student at lesson 4 has: a workstation (read-only, its files in memory), a busybox
container running, one stopped, and a stopped container of the Debian lesson shell. The watch follows the
engine's events, as the gateway does; the first look, which sizes every container, is shown apart. Needs only
the engine; everything is made in a namespace of its own and removed.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
NAMESPACE = f"lcdisk{os.getpid()}"

from sandbox.gateway.disk import DiskWatch  # noqa: E402
from sandbox.gateway.engine import Engine  # noqa: E402


@dataclass
class Sandbox:
    session_id: int
    disk_budget: int = 1 << 40
    disk_full: str | None = None
    build_containers: set[str] = field(default_factory=set)
    build_images: Counter[str] = field(default_factory=Counter)


def labels(session_id: int, role: str) -> dict[str, str]:
    return {
        "layercake.managed": "1",
        "layercake.namespace": NAMESPACE,
        "layercake.session": str(session_id),
        "layercake.role": role,
    }


def populate(api: Any, sandboxes: int) -> None:
    for session_id in range(1, sandboxes + 1):
        workstation = api.create_container(
            "layercake/workstation:latest",
            command=["sleep", "600"],
            labels=labels(session_id, "workstation"),
            host_config=api.create_host_config(read_only=True, tmpfs={"/tmp": "size=16m"}),
        )
        running = api.create_container("busybox:latest", ["sleep", "600"], labels=labels(session_id, "student"))
        stopped = api.create_container("busybox:latest", ["true"], labels=labels(session_id, "student"))
        shell = api.create_container("layercake/shell:latest", ["true"], labels=labels(session_id, "student"))
        for container in (workstation, running, stopped, shell):
            api.start(container["Id"])
        api.wait(stopped["Id"])
        api.wait(shell["Id"])


async def timed(call: Any) -> float:
    started = time.monotonic()
    await call()
    return time.monotonic() - started


async def measure(socket_path: str, sandboxes: int, rounds: int) -> None:
    engine = Engine(socket_path)
    watch = DiskWatch(engine, namespace=NAMESPACE)
    for session_id in range(1, sandboxes + 1):
        watch.join(Sandbox(session_id))
    follower = asyncio.create_task(watch.follow())
    try:
        for _ in range(200):
            if watch.following:
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("the engine's events could not be followed")
        first = await timed(watch.measure)
        looks = [await timed(watch.measure) for _ in range(rounds)]
        dfs = [await timed(lambda: engine.json("GET", "/system/df")) for _ in range(rounds)]
    finally:
        follower.cancel()
    look, df = statistics.median(looks), statistics.median(dfs)
    print(f"sandboxes: {sandboxes}, containers: {4 * sandboxes}, rounds: {rounds}")
    print(f"first look (sizes every container): {first * 1000:8.1f} ms")
    spread = f"min {min(looks) * 1000:.1f}, max {max(looks) * 1000:.1f}"
    print(f"look, median:                       {look * 1000:8.1f} ms  ({spread})")
    spread = f"min {min(dfs) * 1000:.1f}, max {max(dfs) * 1000:.1f}"
    print(f"docker system df, median:           {df * 1000:8.1f} ms  ({spread})")
    print(f"look / system df:                   {look / df:8.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--socket", default="/var/run/docker.sock", help="the engine's socket")
    args = parser.parse_args()
    import docker

    api = docker.APIClient(base_url=f"unix://{args.socket}")
    try:
        populate(api, args.sandboxes)
        asyncio.run(measure(args.socket, args.sandboxes, args.rounds))
    finally:
        for container in api.containers(all=True, filters={"label": f"layercake.namespace={NAMESPACE}"}):
            api.remove_container(container["Id"], force=True)


if __name__ == "__main__":
    main()
