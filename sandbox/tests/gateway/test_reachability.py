"""What a student can reach, probed from inside their workstation and from inside a container they start
through the gateway, in sandboxes made by the real launcher (so the host firewall rule for sandbox bridges
applies): their own containers, and nothing of this machine or of another student.

Every probe has a positive control: the same probe, from the same place, reaches a server of the same kind
on the student's own network; and every target is shown to be live from where it should answer (this
machine, or the other student's own workstation). Only this machine's addresses are probed: loopback and
the networks the project creates.
"""

import secrets
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import docker
import pytest
from django.conf import settings

from .conftest import GatewayProcess, LiveSandbox, SandboxLauncher, TokenServer

pytestmark = [pytest.mark.gateway, pytest.mark.engine, pytest.mark.redis]

NOTHING = "NONE"

WORKSTATION_PROBES = """
probe_http() {
  out=$(curl -s --connect-timeout 1 --max-time 3 "http://$2/" 2>/dev/null | head -c 200 | tr -d '\\r\\n')
  echo "$1 ${out:-NONE}"
}
probe_redis() {
  out=$(printf 'PING\\r\\n' | timeout 3 socat -t 2 - "TCP:$2,connect-timeout=1" 2>/dev/null |
        head -c 60 | tr -d '\\r\\n')
  echo "$1 ${out:-NONE}"
}
"""
# busybox's wget crashes in the curated image (a static build), so HTTP is spoken through nc; pages are one line.
CONTAINER_PROBES = """
probe_http() {
  out=$(printf 'GET / HTTP/1.0\\r\\nHost: probe\\r\\n\\r\\n' | timeout 3 nc -w 1 "${2%:*}" "${2##*:}" 2>/dev/null |
        tail -n 1 | head -c 200 | tr -d '\\r\\n')
  echo "$1 ${out:-NONE}"
}
probe_redis() {
  out=$(printf 'PING\\r\\n' | timeout 3 nc -w 1 "${2%:*}" "${2##*:}" 2>/dev/null | head -c 60 | tr -d '\\r\\n')
  echo "$1 ${out:-NONE}"
}
"""


def redis_port() -> int:
    parts = urlsplit(settings.REDIS_URL)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the test Redis is not on this machine's loopback")
    return parts.port or 6379


@dataclass
class NetworkMap:
    alice: LiveSandbox
    bob: LiveSandbox
    host_address: str
    on_all: TokenServer
    on_loopback: TokenServer
    own_page: str
    secret_page: str
    addresses: dict[str, str] = field(default_factory=dict)

    def targets(self) -> dict[str, tuple[str, str]]:
        """Probe name -> (kind, address:port), as seen from Alice's sandbox."""
        host, redis = self.host_address, redis_port()
        return {
            "own-web": ("http", f"{self.addresses['own']}:80"),
            "own-redis": ("redis", f"{self.addresses['fakeredis']}:6379"),
            "host-app-on-bridge": ("http", f"{host}:{self.on_all.port}"),
            "host-app-on-loopback": ("http", f"127.0.0.1:{self.on_all.port}"),
            "host-loopback-app-on-bridge": ("http", f"{host}:{self.on_loopback.port}"),
            "host-loopback-app-on-loopback": ("http", f"127.0.0.1:{self.on_loopback.port}"),
            "redis-on-bridge": ("redis", f"{host}:{redis}"),
            "redis-on-loopback": ("redis", f"127.0.0.1:{redis}"),
            "other-student": ("http", f"{self.addresses['theirs']}:80"),
            "other-student-by-name": ("http", "theirs:80"),
        }

    def script(self, functions: str) -> str:
        lines = [functions]
        for name, (kind, target) in self.targets().items():
            lines.append(f"probe_{kind} {name} {target} &")
        lines.append("wait")
        return "\n".join(lines)


def ok(result: tuple[int, str]) -> str:
    code, output = result
    assert code == 0, output
    return output


def results(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        name, _, value = line.partition(" ")
        found[name] = value
    return found


def web(sandbox: LiveSandbox, name: str, page: str) -> str:
    command = f"mkdir -p /www && echo {page} > /www/index.html && exec httpd -f -p 80 -h /www"
    ok(sandbox.workstation.docker(f"docker run -d --name {name} busybox sh -c '{command}'"))
    return sandbox.address_of(sandbox.engine_name(name))


@pytest.fixture(scope="module")
def network_map(gateway_process: GatewayProcess, engine: docker.APIClient) -> Iterator[NetworkMap]:
    launcher = SandboxLauncher(engine)
    on_all = TokenServer("0.0.0.0")
    on_loopback = TokenServer("127.0.0.1")
    try:
        alice, bob = launcher.start(), launcher.start()
        network = NetworkMap(
            alice=alice,
            bob=bob,
            host_address=alice.host_address(),
            on_all=on_all,
            on_loopback=on_loopback,
            own_page=f"own-{secrets.token_hex(6)}",
            secret_page=f"secret-{secrets.token_hex(6)}",
        )
        network.addresses["own"] = web(alice, "own", network.own_page)
        network.addresses["theirs"] = web(bob, "theirs", network.secret_page)
        fake_redis = "nc -ll -p 6379 -e sh -c 'read x; echo +PONG'"
        ok(alice.workstation.docker(f"docker run -d --name fakeredis busybox {fake_redis}"))
        network.addresses["fakeredis"] = alice.address_of(alice.engine_name("fakeredis"))
        ok(alice.workstation.docker("docker run -d --name probe busybox sleep 600"))
        yield network
    finally:
        try:
            launcher.cleanup()
        finally:
            on_all.stop()
            on_loopback.stop()


def assert_only_own_network(found: dict[str, str], network: NetworkMap) -> None:
    assert set(found) == set(network.targets()), found
    # Positive controls: the same probes, from the same place, reach the student's own servers.
    assert found.pop("own-web") == network.own_page
    assert found.pop("own-redis") == "+PONG"
    assert found == dict.fromkeys(found, NOTHING)


def assert_targets_are_live(network: NetworkMap) -> None:
    """Each target answers where it should, so an unanswered probe means it was kept out, not that it is down."""
    assert network.on_all.get(network.host_address) == network.on_all.token
    assert network.on_loopback.get("127.0.0.1") == network.on_loopback.token
    with socket.create_connection(("127.0.0.1", redis_port()), timeout=3) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
    bob = network.bob.workstation
    for target in (network.addresses["theirs"], "theirs"):
        assert ok(bob.docker(f"curl -s --max-time 2 http://{target}/")).strip() == network.secret_page
    # Nothing from a sandbox reached this machine's servers: only this test's own requests did.
    assert set(network.on_all.clients) == {network.host_address}
    assert set(network.on_loopback.clients) == {"127.0.0.1"}


def test_the_workstation_reaches_its_own_containers_and_nothing_else(network_map: NetworkMap) -> None:
    output = ok(network_map.alice.workstation.docker(network_map.script(WORKSTATION_PROBES)))
    assert_only_own_network(results(output), network_map)
    assert_targets_are_live(network_map)


def test_a_students_container_reaches_its_neighbours_and_nothing_else(network_map: NetworkMap) -> None:
    script = shlex.quote(network_map.script(CONTAINER_PROBES))
    output = ok(network_map.alice.workstation.docker(f"docker exec probe sh -c {script}"))
    assert_only_own_network(results(output), network_map)
    assert_targets_are_live(network_map)


FIND_SOCKETS = "find / -path /proc -prune -o -path /sys -prune -o -type s -print 2>/dev/null; true"


def test_the_engines_socket_is_nowhere_in_reach(network_map: NetworkMap) -> None:
    ws = network_map.alice.workstation
    # The one socket the workstation has is the gateway's (the control: find does list sockets)...
    assert ok(ws.docker(FIND_SOCKETS)).split() == ["/run/layercake/docker.sock"]
    info = ok(ws.docker("curl -s --max-time 5 --unix-socket /run/layercake/docker.sock http://docker/v1.41/info"))
    assert '"Name": "layercake-sandbox"' in info or '"Name":"layercake-sandbox"' in info
    assert ok(ws.docker("docker ps --format '{{.Names}}'")).split() == ["probe", "fakeredis", "own"]
    # ...and the engine's is not there to be named.
    code, output = ws.docker("docker -H unix:///var/run/docker.sock ps")
    assert code != 0 and "Cannot connect to the Docker daemon at unix:///var/run/docker.sock" in output, output
    # Inside a student's container there is no socket at all, and none can be mounted into one.
    assert ok(ws.docker(f"docker exec probe sh -c {shlex.quote(FIND_SOCKETS)}")) == ""
    for option in (
        "-v /var/run/docker.sock:/var/run/docker.sock",
        "-v /var/run:/host-run",
        "--mount type=bind,source=/var/run/docker.sock,target=/docker.sock",
    ):
        code, output = ws.docker(f"docker run --rm {option} busybox true")
        assert code != 0 and "mounting a host path" in output, (option, output)


def test_a_name_that_is_no_containers_fails_fast_and_container_names_still_resolve(
    network_map: NetworkMap,
) -> None:
    """With no way out, a lookup of any other name can only fail: the resolver is told to give up after a
    second, once (the C library's default is 5 s, twice, per lookup)."""
    ws = network_map.alice.workstation
    for where in ("cat /etc/resolv.conf", "docker exec probe cat /etc/resolv.conf"):
        options = [line for line in ok(ws.docker(where)).splitlines() if line.startswith("options ")]
        assert options and {"timeout:1", "attempts:1"} <= set(options[0].split()), (where, options)
    assert ok(ws.docker("getent hosts own")).split()[1:] == ["own"]
    assert ok(ws.docker("docker exec probe nslookup own")).count(network_map.addresses["own"]) == 1
