"""The sandbox policy: what a student's docker may ask of the shared engine, and how it is rewritten.

Default deny. Only the endpoints in `StudentGateway._routes` (session.py) exist; every other path answers 403
with a message saying that the feature is not available in the sandbox. For the endpoints that exist:

* Bodies are decoded strictly (`http.strict_json`: no repeated keys, also none differing only by case) and
  rebuilt from an allow-list here, field by field, with the engine's canonical key names. Go's decoder
  matches keys case-insensitively, so a key is looked up by its folded form and a non-ASCII key in a struct
  position is refused. A field the policy does not know is refused unless its value is empty; nothing the
  student sent reaches the engine unless this module copied it.
* Creation never grants privilege: no Privileged, no CapAdd (and NET_RAW, MKNOD, AUDIT_WRITE and SETFCAP
  are dropped), no-new-privileges always, no host pid/ipc/uts/user/cgroup namespace, no devices, no sysctls,
  no ulimits, no masked or read-only path changes, no security options except no-new-privileges, no runtime,
  cgroup parent, log driver, DNS or extra-host choices, no tmpfs, no bind mounts of host paths and no volume
  driver or driver options. Named volumes become the student's own volumes (created with labels first).
* Limits: memory (no swap), CPU and pids are forced under per-container caps, and the session's containers
  share a budget (their number and their total memory) that `docker update` cannot raise. Restart policies
  are limited to "no" and "on-failure" with a capped retry count.
* Networking: a container joins the session's own internal network with its name as an alias, or none.
  Published ports are never bound on the host: they are recorded in a label, shown by ps and inspect as
  docker shows them, and served inside the session (see `ports.py`): at most 8 per container, TCP only,
  each host port held by one running container at a time.
* Builds: classic builder only, no remote context, no host network (RUN steps get no network), no pull,
  no cgroup parent, limits forced; the Dockerfile's FROM and COPY --from images are resolved as the student
  sees them (their own or curated; a stage's own name, within it, is an image's, as the classic builder
  reads it), ADD of URLs, ADD of an archive in the context (which the engine would unpack, to whatever size,
  in no container) and ONBUILD are refused, and variables in FROM or ADD sources are refused because
  they would be resolved after this check (ADD in JSON form is read as the engine decodes it, and JSON
  escapes there are refused). The Dockerfile (at most 256 KB) is read as the engine's parser reads it, in
  linear time, and what its versions could read two ways is refused. Compressed contexts are expanded
  within the context limit; a context with a path through a symbolic link (or a hard link, which may be one)
  is refused.
* Commits take only the instructions docker allows minus ONBUILD, and never a label in layercake's space
  (also not behind quotes or escapes).
* Labels: an image or container carries at most 16 KB of the student's (its image's included), and one
  sandbox's images 256 KB in all, since every student's docker reads the engine's whole list of images.
* What the engine keeps for everyone stays small: an exec instance takes 16 KB of command and environment
  (and a container has 32 unfinished ones at most), a container 16 volumes and an image 64 (its base's
  included), a volume 16 KB of labels; what variables and EXPOSE ranges add to an image's configuration beyond
  the Dockerfile's (or --change's) text is bounded, and images are weighed in session.py.
* Healthchecks, of a created container or in a Dockerfile, run at most once a second, with no option the
  policy does not know.
* Filters are read as docker reads them; name filters are RE2 expressions, as Go's are.
"""

import bz2
import io
import json
import lzma
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import re2

from .http import HttpError, bounded_json

LABEL_SPACE = "layercake."
FORCED_CAP_DROP = ["AUDIT_WRITE", "MKNOD", "NET_RAW", "SETFCAP"]
NO_NEW_PRIVILEGES = "no-new-privileges:true"
LOG_CONFIG = {"Type": "local", "Config": {"max-size": "1m", "max-file": "1", "compress": "false"}}
# A sandbox network has no way out, so the engine's resolver cannot reach any server for a name that is not a
# container's: the C library would wait 5 s, twice, for each lookup (curl a host name: 10 s; getent: 20 s).
# A container's name the engine answers at once itself, so one second, once, costs those lookups nothing.
DNS_OPTIONS = ["timeout:1", "attempts:1"]
MB = 1024 * 1024
# Each published port is a listener in the workstation (see ports.py); a handful is all a lesson needs.
MAX_PUBLISHED_PORTS = 8


class Refused(HttpError):
    """The student asked for something the sandbox does not allow: 403 with a message that says why."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(status, message)


def not_available(what: str) -> Refused:
    return Refused(f"{what} is not available in the Layercake sandbox")


# Resource options the sandbox sets itself, by the docker run flag a student would have typed.
RESOURCE_FLAGS = {
    "BlkioWeight": "--blkio-weight",
    "BlkioWeightDevice": "--blkio-weight-device",
    "BlkioDeviceReadBps": "--device-read-bps",
    "BlkioDeviceWriteBps": "--device-write-bps",
    "BlkioDeviceReadIOps": "--device-read-iops",
    "BlkioDeviceWriteIOps": "--device-write-iops",
    "CpuPeriod": "--cpu-period",
    "CpuQuota": "--cpu-quota",
    "CpuRealtimePeriod": "--cpu-rt-period",
    "CpuRealtimeRuntime": "--cpu-rt-runtime",
    "CpusetCpus": "--cpuset-cpus",
    "CpusetMems": "--cpuset-mems",
    "CpuCount": "--cpu-count",
    "CpuPercent": "--cpu-percent",
    "IOMaximumIOps": "--io-maxiops",
    "IOMaximumBandwidth": "--io-maxbandwidth",
}


def is_zero(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == "" or value == [] or value == {}


class Fields:
    """A JSON object seen as a Go struct: keys matched case-insensitively, each consumed at most once."""

    def __init__(self, obj: Any, where: str) -> None:
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            raise HttpError(400, f"{where}: expected a JSON object")
        self.where = where
        self.items: dict[str, tuple[str, Any]] = {}
        for key, value in obj.items():
            if not key.isascii():
                raise HttpError(400, f"{where}: unexpected field {key!r}")
            self.items[key.lower()] = (key, value)
        self.used: set[str] = set()

    def take(self, name: str, default: Any = None) -> Any:
        folded = name.lower()
        self.used.add(folded)
        if folded not in self.items:
            return default
        value = self.items[folded][1]
        return default if value is None else value

    def deny(self, name: str, what: str) -> None:
        if not is_zero(self.take(name)):
            raise not_available(what)

    def finish(self) -> None:
        for folded, (key, value) in self.items.items():
            if folded not in self.used and not is_zero(value):
                raise not_available(f"the option {self.where}.{key}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise HttpError(400, f"{where}: wrong type")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise HttpError(400, f"{where}: expected a list of strings")
    return list(value)


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise HttpError(400, f"{where}: expected an object of strings")
    return dict(value)


def student_labels(value: Any, where: str = "Labels") -> dict[str, str]:
    labels = _str_map(value, where)
    for key in labels:
        if key.lower().startswith(LABEL_SPACE):
            raise Refused(f"labels starting with {LABEL_SPACE!r} are reserved by the sandbox: {key}")
    return labels


# The engine lists every image with its labels, and nearly every command of every student reads that list whole:
# an image (or a container, which a commit makes into one) carries at most this much of the student's labels,
# counted as keys and values (or as the text of LABEL instructions), and one sandbox's images this much in all.
LABELS_MAX = 16 * 1024
SANDBOX_LABELS_MAX = 256 * 1024


def labels_size(labels: Mapping[str, Any] | None) -> int:
    """The bytes of an image's or container's labels that are not layercake's."""
    return sum(
        len(key.encode()) + len(str(value).encode())
        for key, value in (labels or {}).items()
        if not key.startswith(LABEL_SPACE)
    )


def refuse_large_labels(size: int) -> None:
    if size > LABELS_MAX:
        raise Refused(
            f"an image or container in the sandbox may carry at most {LABELS_MAX // 1024} KB of labels "
            "(with those of its image)"
        )


def _label_text_size(instructions: "list[Instruction]") -> int:
    """What LABEL instructions add at most: their text (no variables in them: see `mentions_reserved_label`)."""
    return sum(len(i.args.encode()) for i in instructions if i.word == "LABEL")


@dataclass(frozen=True)
class Limits:
    container_memory_max: int
    default_memory: int
    nano_cpus: int
    pids: int
    restart_retries: int
    shm_max: int


@dataclass(frozen=True)
class PortBinding:
    host_port: int
    container_port: int
    proto: str
    # As the student typed it: "" (every address), "0.0.0.0", "::" or "127.0.0.1". The port answers on the
    # workstation's loopback whichever it is; the address is kept so that docker's outputs show it.
    host_ip: str = ""

    @property
    def key(self) -> str:
        return f"{self.container_port}/{self.proto}"

    @property
    def addresses(self) -> list[str]:
        """The addresses docker lists the port on: both families for one published on every address."""
        return ["0.0.0.0", "::"] if self.host_ip == "" else [self.host_ip]

    def label(self) -> str:
        address = f"[{self.host_ip}]:" if ":" in self.host_ip else f"{self.host_ip}:" if self.host_ip else ""
        return f"{address}{self.host_port}:{self.container_port}/{self.proto}"


def ports_label(ports: list[PortBinding]) -> str:
    return ",".join(port.label() for port in ports)


def port_filter(value: str) -> Callable[[int, str], bool]:
    """`docker ps --filter publish=PORT[-END][/PROTO]`: a test of a published port and its protocol."""
    match = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp|sctp))?", value)
    if match is None:
        raise HttpError(400, f"Invalid filter 'publish={value}'")
    start = int(match.group(1))
    end = int(match.group(2) or start)
    proto = match.group(3) or "tcp"
    return lambda port, kind: start <= port <= end and kind == proto


def parse_ports_label(value: str) -> list[PortBinding]:
    ports = []
    for item in filter(None, value.split(",")):
        match = re.fullmatch(r"(?:([0-9.]+):|\[([0-9a-f:]+)\]:)?(\d+):(\d+)/(tcp|udp|sctp)", item)
        if match:
            ipv4, ipv6, host_port, container_port, proto = match.groups()
            ports.append(PortBinding(int(host_port), int(container_port), proto, ipv4 or ipv6 or ""))
    return ports


# Each volume a container has, its image's anonymous ones included, is a directory the engine keeps and lists
# for every student's docker volume ls; a create body could name tens of thousands.
MAX_CONTAINER_VOLUMES = 16
# Each step of a build is a container of its image's volumes so far, made and removed: an image may name more than
# a container may have (such an image cannot be run), within reason.
MAX_IMAGE_VOLUMES = 4 * MAX_CONTAINER_VOLUMES


@dataclass
class CreatePlan:
    """A container creation as the policy allows it, before names are mapped to the engine's."""

    image: str
    config: dict[str, Any]
    host_config: dict[str, Any]
    network_none: bool
    aliases: list[str]
    volumes: list[tuple[str, str, str]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    ports: list[PortBinding] = field(default_factory=list)
    memory: int = 0


CONFIG_KEEP: dict[str, type | tuple[type, ...]] = {
    "Hostname": str,
    "Domainname": str,
    "User": str,
    "AttachStdin": bool,
    "AttachStdout": bool,
    "AttachStderr": bool,
    "Tty": bool,
    "OpenStdin": bool,
    "StdinOnce": bool,
    "WorkingDir": str,
    "NetworkDisabled": bool,
    "StopSignal": str,
    "ExposedPorts": dict,
    "Volumes": dict,
}


def _cmd(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    return _str_list(value, where)


SECOND = 1_000_000_000


def _healthcheck(raw: Any) -> dict[str, Any]:
    """Each check is an exec the shared engine runs: not more often than once a second."""
    spec = Fields(raw, "Healthcheck")
    out: dict[str, Any] = {"Test": _str_list(spec.take("Test"), "Healthcheck.Test")}
    for name in ("Interval", "Timeout", "StartPeriod", "Retries"):
        value = _typed(spec.take(name, 0), int, f"Healthcheck.{name}")
        if value < 0:
            raise HttpError(400, f"Healthcheck.{name} must not be negative")
        if name == "Interval" and 0 < value < SECOND:
            raise Refused("--health-interval must be at least 1s in the sandbox")
        if value:
            out[name] = value
    spec.finish()
    return out


def container_create_plan(*, body: Any, limits: Limits, network: str) -> CreatePlan:
    top = Fields(body, "Config")
    config: dict[str, Any] = {}
    for name, kind in CONFIG_KEEP.items():
        value = top.take(name)
        if value is not None:
            config[name] = _typed(value, kind, name)
    for name in ("Env", "Shell"):
        value = top.take(name)
        if value is not None:
            config[name] = _str_list(value, name)
    for name in ("Cmd", "Entrypoint"):
        value = _cmd(top.take(name), name)
        if value is not None:
            config[name] = value
    healthcheck = top.take("Healthcheck")
    if healthcheck is not None:
        config["Healthcheck"] = _healthcheck(healthcheck)
    stop_timeout = top.take("StopTimeout")
    if stop_timeout is not None:
        config["StopTimeout"] = min(max(_typed(stop_timeout, int, "StopTimeout"), 0), 60)
    config["Labels"] = student_labels(top.take("Labels"))
    image = top.take("Image", "")
    if not isinstance(image, str) or not image:
        raise HttpError(400, "No image was specified")
    top.take("ArgsEscaped")
    top.deny("MacAddress", "choosing a MAC address")
    top.deny("OnBuild", "ONBUILD")
    host = Fields(top.take("HostConfig"), "HostConfig")
    networking = Fields(top.take("NetworkingConfig"), "NetworkingConfig")
    top.finish()

    plan = CreatePlan(image=image, config=config, host_config={}, network_none=False, aliases=[])
    _host_config(host, plan, limits=limits, network=network)
    _networking(networking, plan, network=network)
    return plan


def _host_config(host: Fields, plan: CreatePlan, *, limits: Limits, network: str) -> None:
    out = plan.host_config
    host.deny("Privileged", "--privileged")
    host.deny("CapAdd", "--cap-add")
    host.deny("Devices", "--device")
    host.deny("DeviceCgroupRules", "--device-cgroup-rule")
    host.deny("DeviceRequests", "--gpus")
    host.deny("Sysctls", "--sysctl")
    host.deny("Ulimits", "--ulimit")
    host.deny("Tmpfs", "--tmpfs")
    host.deny("StorageOpt", "--storage-opt")
    host.deny("Dns", "--dns")
    host.deny("DnsOptions", "--dns-option")
    host.deny("DnsSearch", "--dns-search")
    host.deny("ExtraHosts", "--add-host")
    host.deny("Links", "--link")
    host.deny("GroupAdd", "--group-add")
    host.deny("VolumesFrom", "--volumes-from")
    host.deny("VolumeDriver", "--volume-driver")
    host.deny("CgroupParent", "--cgroup-parent")
    host.deny("Cgroup", "--cgroup")
    host.deny("PidMode", "--pid")
    host.deny("UTSMode", "--uts")
    host.deny("UsernsMode", "--userns")
    host.deny("PublishAllPorts", "-P (publish all ports)")
    host.deny("OomKillDisable", "--oom-kill-disable")
    host.deny("KernelMemory", "--kernel-memory")
    host.deny("KernelMemoryTCP", "--kernel-memory-tcp")
    for name, flag in RESOURCE_FLAGS.items():
        host.deny(name, flag)
    for name in ("MaskedPaths", "ReadonlyPaths"):
        if host.take(name) is not None:
            raise not_available("changing masked or read-only system paths (--security-opt systempaths)")
    for option in _str_list(host.take("SecurityOpt"), "SecurityOpt"):
        if option.replace("=", ":") not in ("no-new-privileges", "no-new-privileges:true"):
            raise not_available(f"--security-opt {option}")
    runtime = host.take("Runtime", "")
    if runtime not in ("", "runc"):
        raise not_available("--runtime")
    isolation = host.take("Isolation", "")
    if isolation not in ("", "default"):
        raise not_available("--isolation")
    for name in ("IpcMode", "CgroupnsMode"):
        value = host.take(name, "")
        if value not in ("", "private", "none", "shareable"):
            raise not_available(f"--{name.lower().removesuffix('mode')} {value}")
        if value:
            out[name] = value
    log_config = Fields(host.take("LogConfig"), "LogConfig")
    if log_config.take("Type", "") not in ("",) or not is_zero(log_config.take("Config")):
        raise not_available("choosing a log driver (--log-driver, --log-opt)")
    log_config.finish()
    host.take("ContainerIDFile")
    host.take("MemorySwappiness")
    host.take("MemorySwap")

    memory = host.take("Memory", 0)
    _typed(memory, int, "Memory")
    if memory < 0:
        raise HttpError(400, "invalid memory limit")
    if memory > limits.container_memory_max:
        raise Refused(
            f"a container in the sandbox may use at most {limits.container_memory_max // MB} MB of memory"
        )
    if memory and memory < 6 * MB:
        raise HttpError(400, "Minimum memory limit allowed is 6MB")
    memory = memory or limits.default_memory
    plan.memory = memory
    reservation = host.take("MemoryReservation", 0)
    if reservation:
        out["MemoryReservation"] = min(_typed(reservation, int, "MemoryReservation"), memory)
    out["Memory"] = memory
    out["MemorySwap"] = memory
    nano_cpus = _typed(host.take("NanoCpus", 0), int, "NanoCpus")
    if nano_cpus < 0 or nano_cpus > limits.nano_cpus:
        raise Refused(f"a container in the sandbox may use at most {limits.nano_cpus / 1e9:g} CPUs")
    out["NanoCpus"] = nano_cpus or limits.nano_cpus
    shares = _typed(host.take("CpuShares", 0), int, "CpuShares")
    if shares:
        out["CpuShares"] = min(max(shares, 2), 1024)
    pids = host.take("PidsLimit")
    pids = 0 if pids is None else _typed(pids, int, "PidsLimit")
    out["PidsLimit"] = pids if 0 < pids <= limits.pids else limits.pids
    shm = _typed(host.take("ShmSize", 0), int, "ShmSize")
    if shm > limits.shm_max:
        raise Refused(f"--shm-size may be at most {limits.shm_max // MB} MB in the sandbox")
    if shm:
        out["ShmSize"] = shm
    oom_score = _typed(host.take("OomScoreAdj", 0), int, "OomScoreAdj")
    if oom_score < 0:
        raise not_available("lowering the OOM score")
    if oom_score:
        out["OomScoreAdj"] = min(oom_score, 1000)

    cap_drop = {cap.upper().removeprefix("CAP_") for cap in _str_list(host.take("CapDrop"), "CapDrop")}
    out["CapDrop"] = sorted(cap_drop | set(FORCED_CAP_DROP)) if "ALL" not in cap_drop else ["ALL"]
    out["SecurityOpt"] = [NO_NEW_PRIVILEGES]
    out["Privileged"] = False
    out["PublishAllPorts"] = False
    out["LogConfig"] = LOG_CONFIG
    out["DnsOptions"] = DNS_OPTIONS
    for name in ("AutoRemove", "ReadonlyRootfs", "Init"):
        value = host.take(name)
        if value is not None:
            out[name] = _typed(value, bool, name)
    console = host.take("ConsoleSize")
    if console is not None:
        if not (isinstance(console, list) and len(console) == 2 and all(isinstance(v, int) for v in console)):
            raise HttpError(400, "ConsoleSize: wrong type")
        out["ConsoleSize"] = console
    out["RestartPolicy"] = restart_policy(host.take("RestartPolicy"), limits=limits)

    mode = host.take("NetworkMode", "")
    if mode in ("", "default", "bridge", network):
        out["NetworkMode"] = network
    elif mode == "none":
        out["NetworkMode"] = "none"
        plan.network_none = True
    else:
        raise not_available(f"--network {mode}")

    for bind in _str_list(host.take("Binds"), "Binds"):
        plan.volumes.append(_parse_bind(bind))
    mounts = host.take("Mounts")
    if mounts is not None:
        if not isinstance(mounts, list):
            raise HttpError(400, "Mounts: wrong type")
        for mount in mounts:
            plan.mounts.append(_mount(mount))
    plan.ports = _port_bindings(host.take("PortBindings"))
    host.finish()


def _parse_bind(bind: str) -> tuple[str, str, str]:
    parts = bind.split(":")
    if len(parts) < 2 or len(parts) > 3:
        raise HttpError(400, f"invalid volume specification: '{bind}'")
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else ""
    if source.startswith(("/", ".", "~")) or "/" in source or "\\" in source:
        raise not_available(f"mounting a host path ({source})")
    if not target.startswith("/"):
        raise HttpError(400, f"invalid volume specification: '{bind}': invalid mount config for type \"volume\"")
    for option in filter(None, mode.split(",")):
        if option not in ("ro", "rw", "nocopy", "z", "Z"):
            raise not_available(f"the volume option {option}")
    return source, target, mode


def _mount(raw: Any) -> dict[str, Any]:
    mount = Fields(raw, "Mounts")
    kind = mount.take("Type", "")
    if kind == "bind":
        raise not_available("mounting a host path (--mount type=bind)")
    if kind != "volume":
        raise not_available(f"--mount type={kind}")
    source = _typed(mount.take("Source", ""), str, "Mounts.Source")
    target = _typed(mount.take("Target", ""), str, "Mounts.Target")
    if "/" in source or not target.startswith("/"):
        raise HttpError(400, 'invalid mount config for type "volume"')
    read_only = bool(mount.take("ReadOnly", False))
    mount.take("Consistency")
    mount.deny("BindOptions", "bind options")
    mount.deny("TmpfsOptions", "tmpfs options")
    options = Fields(mount.take("VolumeOptions"), "Mounts.VolumeOptions")
    no_copy = bool(options.take("NoCopy", False))
    options.deny("DriverConfig", "volume driver options")
    options.deny("Labels", "volume labels in --mount")
    options.finish()
    mount.finish()
    result: dict[str, Any] = {"Type": "volume", "Source": source, "Target": target, "ReadOnly": read_only}
    if no_copy:
        result["VolumeOptions"] = {"NoCopy": True}
    return result


def _port_bindings(raw: Any) -> list[PortBinding]:
    if is_zero(raw):
        return []
    if not isinstance(raw, dict):
        raise HttpError(400, "PortBindings: wrong type")
    ports: list[PortBinding] = []
    for key, bindings in raw.items():
        match = re.fullmatch(r"(\d{1,5})(?:/(tcp|udp|sctp))?", key)
        if not match:
            raise HttpError(400, f"invalid port {key}")
        container_port, proto = int(match.group(1)), match.group(2) or "tcp"
        if not isinstance(bindings, list | None):
            raise HttpError(400, "PortBindings: wrong type")
        for binding in bindings or []:
            entry = Fields(binding, "PortBindings")
            host_ip = entry.take("HostIp", "")
            host_port = str(entry.take("HostPort", ""))
            entry.finish()
            if host_ip not in ("", "0.0.0.0", "127.0.0.1", "::", "localhost"):
                raise not_available(f"publishing on the address {host_ip}")
            host_ip = "127.0.0.1" if host_ip == "localhost" else host_ip
            if not host_port:
                raise Refused("choose the port in the sandbox: -p HOSTPORT:CONTAINERPORT (e.g. -p 8080:80)")
            if (
                not re.fullmatch(r"[0-9]{1,5}", host_port)
                or not 0 < int(host_port) < 65536
                or not 0 < container_port < 65536
            ):
                raise HttpError(400, f"invalid port {host_port}")
            if proto != "tcp":
                raise not_available("publishing a UDP or SCTP port")
            ports.append(PortBinding(int(host_port), container_port, proto, host_ip))
    hosts = [port.host_port for port in ports]
    if len(hosts) != len(set(hosts)):
        raise HttpError(400, "the same host port is published twice")
    if len(ports) > MAX_PUBLISHED_PORTS:
        raise Refused(f"a container in the sandbox may publish at most {MAX_PUBLISHED_PORTS} ports")
    return ports


def _networking(networking: Fields, plan: CreatePlan, *, network: str) -> None:
    endpoints = networking.take("EndpointsConfig")
    networking.finish()
    if is_zero(endpoints):
        return
    if not isinstance(endpoints, dict):
        raise HttpError(400, "EndpointsConfig: wrong type")
    for name, raw in endpoints.items():
        if plan.network_none and name == "none":
            continue
        if name not in ("bridge", "default", network):
            raise not_available(f"--network {name}")
        endpoint = Fields(raw, "EndpointSettings")
        plan.aliases.extend(_str_list(endpoint.take("Aliases"), "Aliases"))
        endpoint.deny("IPAMConfig", "choosing an IP address")
        endpoint.deny("Links", "--link")
        endpoint.deny("MacAddress", "choosing a MAC address")
        endpoint.deny("DriverOpts", "network driver options")
        for ignored in ("NetworkID", "EndpointID", "Gateway", "IPAddress", "IPPrefixLen", "IPv6Gateway"):
            endpoint.take(ignored)
        for ignored in ("GlobalIPv6Address", "GlobalIPv6PrefixLen"):
            endpoint.take(ignored)
        endpoint.finish()


def restart_policy(raw: Any, *, limits: Limits) -> dict[str, Any]:
    policy = Fields(raw, "RestartPolicy")
    name = policy.take("Name", "")
    retries = _typed(policy.take("MaximumRetryCount", 0), int, "MaximumRetryCount")
    policy.finish()
    if name in ("", "no"):
        return {"Name": "no", "MaximumRetryCount": 0}
    if name == "on-failure":
        retries = limits.restart_retries if retries <= 0 else min(retries, limits.restart_retries)
        return {"Name": "on-failure", "MaximumRetryCount": retries}
    raise Refused(
        f"--restart {name} is not available in the sandbox; use --restart on-failure[:N] (N up to "
        f"{limits.restart_retries})"
    )


@dataclass
class UpdatePlan:
    body: dict[str, Any]
    memory: int | None


def container_update_plan(*, body: Any, limits: Limits) -> UpdatePlan:
    update = Fields(body, "UpdateConfig")
    out: dict[str, Any] = {}
    memory = _typed(update.take("Memory", 0), int, "Memory")
    if memory:
        if memory > limits.container_memory_max or memory < 6 * MB:
            raise Refused(
                f"a container in the sandbox may use between 6 and {limits.container_memory_max // MB} MB"
            )
        out["Memory"] = memory
        out["MemorySwap"] = memory
    update.take("MemorySwap")
    reservation = _typed(update.take("MemoryReservation", 0), int, "MemoryReservation")
    if reservation:
        out["MemoryReservation"] = reservation
    nano_cpus = _typed(update.take("NanoCpus", 0), int, "NanoCpus")
    if nano_cpus:
        if nano_cpus < 0 or nano_cpus > limits.nano_cpus:
            raise Refused(f"a container in the sandbox may use at most {limits.nano_cpus / 1e9:g} CPUs")
        out["NanoCpus"] = nano_cpus
    shares = _typed(update.take("CpuShares", 0), int, "CpuShares")
    if shares:
        out["CpuShares"] = min(max(shares, 2), 1024)
    pids = update.take("PidsLimit")
    if pids is not None and pids != 0:
        if _typed(pids, int, "PidsLimit") < 0 or pids > limits.pids:
            raise Refused(f"a container in the sandbox may run at most {limits.pids} processes")
        out["PidsLimit"] = pids
    restart = update.take("RestartPolicy")
    if not is_zero(restart):
        out["RestartPolicy"] = restart_policy(restart, limits=limits)
    update.deny("KernelMemory", "--kernel-memory")
    update.deny("CpusetCpus", "--cpuset-cpus")
    update.finish()
    return UpdatePlan(body=out, memory=memory or None)


# The engine keeps each exec instance, its command and environment included, in its memory until the instance
# has finished and a while after, or until its container goes if it never starts; so each is small, and a
# container has a few unfinished ones at most (see `StudentGateway.exec_create`).
EXEC_CONFIG_MAX = 16 * 1024
MAX_PENDING_EXECS = 32


def exec_create_body(body: Any) -> dict[str, Any]:
    spec = Fields(body, "ExecConfig")
    spec.deny("Privileged", "docker exec --privileged")
    out: dict[str, Any] = {}
    # Detach is what `docker exec -d` says; the engine reads it from the start request.
    for name in ("AttachStdin", "AttachStdout", "AttachStderr", "Tty", "Detach"):
        value = spec.take(name)
        if value is not None:
            out[name] = _typed(value, bool, name)
    for name in ("User", "WorkingDir", "DetachKeys"):
        value = spec.take(name)
        if value is not None:
            out[name] = _typed(value, str, name)
    out["Env"] = _str_list(spec.take("Env"), "Env")
    out["Cmd"] = _str_list(spec.take("Cmd"), "Cmd")
    if not out["Cmd"]:
        raise HttpError(400, "No exec command specified")
    console = spec.take("ConsoleSize")
    if console is not None:
        out["ConsoleSize"] = console
    spec.finish()
    if len(json.dumps(out)) > EXEC_CONFIG_MAX:
        raise Refused(
            f"docker exec in the sandbox takes at most {EXEC_CONFIG_MAX // 1024} KB of command and environment; "
            "put a long script in a file"
        )
    return out


def exec_start_body(body: Any) -> dict[str, Any]:
    spec = Fields(body, "ExecStartConfig")
    out = {"Detach": bool(spec.take("Detach", False)), "Tty": bool(spec.take("Tty", False))}
    console = spec.take("ConsoleSize")
    if console is not None:
        out["ConsoleSize"] = console
    spec.finish()
    return out


# `docker top` runs ps on the host over every process and keeps the rows whose PID column is the container's;
# rows whose PID column reads "-" stay with the row above (threads). A column renamed PID (`rtprio=PID`), a
# value of more than one word before the PID column (`lstart`, a `comm` the student set to "x 4242") or a
# security label ("docker-default (enforce)") would make that column read something else, and show the host's
# processes. So the format is only what reads one word per column, the command last.
TOP_FORMAT_LETTERS = frozenset("fFjluv")
TOP_STD_FLAGS_RE = re.compile(r"-[AaefFjlLHmwy]+")
TOP_BSD_FLAGS_RE = re.compile(r"[auxefjlmvwH]+")
TOP_FORMAT_OPTION_RE = re.compile(r"-([AaeLHmwy]*)o(.*)|o")
_TOP_ONE_WORD_COLUMNS = (
    "pid ppid pgid pgrp sid sess tid lwp spid tgid nlwp thcount user euser ruser uid euid ruid gid egid rgid "
    "group egroup rgroup stat state s tty tt tname time cputime etime etimes pcpu %cpu c pmem %mem rss rssize "
    "rsz vsz vsize sz ni nice pri psr f flags stime start bsdstart bsdtime wchan"
)
TOP_ONE_WORD_COLUMNS = frozenset(_TOP_ONE_WORD_COLUMNS.split())
_TOP_LAST_COLUMNS = "args cmd command comm ucmd ucomm"
TOP_LAST_COLUMNS = frozenset(_TOP_LAST_COLUMNS.split())


def top_args(text: str) -> str:
    """The ps options of `docker top`, if they keep each row's PID column its own."""
    refused = HttpError(
        400,
        "unsupported ps options for docker top in the sandbox: use ps flags such as -ef or aux, or -o with "
        "plain column names (the command last)",
    )
    if len(text) > 128 or not re.fullmatch(r"[ -~]*", text):
        raise refused
    tokens = text.split()
    letters = ""
    columns: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        format_option = TOP_FORMAT_OPTION_RE.fullmatch(token)
        if format_option:
            letters += format_option.group(1) or ""
            listed = format_option.group(2)
            if not listed:
                if index >= len(tokens):
                    raise refused
                listed = tokens[index]
                index += 1
            columns += listed.split(",")
        elif TOP_STD_FLAGS_RE.fullmatch(token) or TOP_BSD_FLAGS_RE.fullmatch(token):
            letters += token.lstrip("-")
        else:
            raise refused
    if columns:
        if TOP_FORMAT_LETTERS & set(letters) or "pid" not in columns:
            raise refused
        for position, column in enumerate(columns):
            last = position == len(columns) - 1
            if column not in TOP_ONE_WORD_COLUMNS and not (last and column in TOP_LAST_COLUMNS):
                raise refused
    return " ".join(tokens)


def volume_create_body(body: Any) -> tuple[str, dict[str, str]]:
    spec = Fields(body, "VolumeCreate")
    name = _typed(spec.take("Name", ""), str, "Name")
    driver = spec.take("Driver", "")
    if driver not in ("", "local"):
        raise not_available(f"the volume driver {driver}")
    spec.deny("DriverOpts", "volume driver options (--opt)")
    labels = student_labels(spec.take("Labels"))
    # The engine keeps every volume's labels in its memory, and in its one answer to docker system df, which the
    # gateway reads for every student's (see `session.DiskUsage`).
    if labels_size(labels) > LABELS_MAX:
        raise Refused(f"a volume in the sandbox may carry at most {LABELS_MAX // 1024} KB of labels")
    spec.take("ClusterVolumeSpec")
    spec.finish()
    return name, labels


# Compiling is the costly part of RE2 (its memory bound sets how much an expression may unfold), so both
# the bound and the number of expressions a request may give are small.
NAME_PATTERN_MEMORY = 256 * 1024
NAME_FILTERS_MAX = 8


class NamePattern:
    """A `docker ps --filter name=` regular expression, read and matched as docker's Go regexp does: RE2, in
    time linear in the name; compiled within a small memory bound, so that no student's pattern can hold the
    gateway's event loop (a few at most per request: see `name_patterns`)."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > 256:
            raise HttpError(400, "the name filter is too long")
        options = re2.Options()
        options.log_errors = False
        options.max_mem = NAME_PATTERN_MEMORY
        try:
            self.regex = re2.compile(pattern, options)
        except re2.error as exc:
            raise HttpError(400, f"Invalid filter 'name={pattern}': error parsing regexp") from exc

    def search(self, name: str) -> bool:
        return self.regex.search(name) is not None


def name_patterns(values: list[str]) -> list[NamePattern]:
    distinct = list(dict.fromkeys(values))
    if len(distinct) > NAME_FILTERS_MAX:
        raise HttpError(400, f"at most {NAME_FILTERS_MAX} name filters at once in the sandbox")
    return [NamePattern(value) for value in distinct]


COMMIT_INSTRUCTIONS = {"CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "USER", "VOLUME", "WORKDIR"}


def commit_changes(changes: list[str]) -> list[str]:
    """The student's --change lines, read as the engine reads them: joined by newlines, as one Dockerfile."""
    changes = [change for change in changes if change.strip()]
    sentinel = "LABEL end-of-changes=1"
    parsed = parse_dockerfile("\n".join([*changes, sentinel]))
    *instructions, last = parsed.instructions
    if last.start != len(parsed.lines) - 1:
        raise HttpError(400, "a --change ends with a line continuation")
    for instruction in instructions:
        if instruction.word == "ONBUILD":
            raise not_available("ONBUILD")
        if instruction.word not in COMMIT_INSTRUCTIONS:
            raise HttpError(400, f"{instruction.word} is not a valid change command")
        if instruction.word == "LABEL" and mentions_reserved_label(
            " ".join([*instruction.flags, instruction.args])
        ):
            raise Refused(f"labels starting with {LABEL_SPACE!r} are reserved by the sandbox")
    return changes


def changes_label_size(changes: list[str]) -> int:
    """What the LABEL instructions of checked --change lines (`commit_changes`) add to an image's labels."""
    return _label_text_size(parse_dockerfile("\n".join(changes)).instructions) if changes else 0


def changes_growth(changes: list[str], config: dict[str, Any]) -> int:
    """What checked --change lines add to the configuration of a container's image (`configuration_growth`)."""
    return (
        configuration_growth(parse_dockerfile("\n".join(changes)).instructions, bases=[config]) if changes else 0
    )


# Builds.
#
# The engine reads a Dockerfile with its own Go parser. The checks below read it as that parser does, step for
# step (lines, BOM, parser directives, comments, continuations glued without a space, the instruction word
# split off at tabs too, flags read byte by byte), and refuse what its versions could read differently
# instead of guessing: control characters and unusual white space, an escape directive past the first line,
# a line ending in a doubled escape, non-ASCII in flags, quotes or escapes in an image name.

INSTRUCTIONS = frozenset(
    [
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "MAINTAINER",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    ]
)
UNUSUAL_CHARACTERS_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]|\r(?!\n)"
)
# Matched against a line whose trailing blanks are gone, so that it takes time linear in the line.
DIRECTIVE_RE = re.compile(r"#[ \t]*([a-zA-Z][a-zA-Z0-9]*)[ \t]*=[ \t]*([^ \t].*)")
# One part of a Go duration ("1.5h", "30s"), and what each unit is in nanoseconds.
GO_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
DOCKERFILE_MAX = 256 * 1024
BLANKS_RE = re.compile(r"[ \t]+")
# Read the same with or without the shell-like word processing docker applies to image names.
PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]*")
FLAG_VALUE_RE = re.compile(r"[A-Za-z0-9_.:/@+=,-]*")
STAGE_NAME_RE = re.compile(r"[a-z][a-z0-9-_.]*")
STAGE_INDEX_RE = re.compile(r"[+-]?[0-9]+")
QUOTES_AND_ESCAPES_RE = re.compile(r"[\"'\\`]")
# Go's unicode.IsSpace applied to a single byte, as docker's flag reader does.
GO_BYTE_SPACES = frozenset(b"\t\n\x0b\x0c\r \x85\xa0")


@dataclass(frozen=True)
class Instruction:
    start: int
    end: int
    word: str
    flags: tuple[str, ...]
    args: str


@dataclass
class Dockerfile:
    """A Dockerfile's instructions with their physical line spans, for checking and rewriting."""

    lines: list[str]
    escape: str
    instructions: list[Instruction]

    def rewrite(self, replacements: Mapping[int, str]) -> str:
        by_start = {self.instructions[position].start: position for position in replacements}
        out: list[str] = []
        index = 0
        while index < len(self.lines):
            position = by_start.get(index)
            if position is None:
                out.append(self.lines[index])
                index += 1
                continue
            out.append(replacements[position])
            index = self.instructions[position].end + 1
        return "\n".join(out) + "\n"


def parse_dockerfile(text: str) -> Dockerfile:
    text = text.removeprefix("\ufeff")
    if UNUSUAL_CHARACTERS_RE.search(text):
        raise Refused("the Dockerfile holds control characters or unusual white space, which the sandbox refuses")
    lines = text.replace("\r\n", "\n").split("\n")
    escape = "\\"
    first = DIRECTIVE_RE.fullmatch(lines[0].strip(" \t"))
    if first and first.group(1).lower() == "escape":
        if first.group(2) not in ("\\", "`"):
            raise HttpError(400, f"invalid ESCAPE '{first.group(2)}'. Must be ` or \\")
        escape = first.group(2)
    for line in lines[1:]:
        stripped = line.lstrip(" \t")
        if not stripped.startswith("#"):
            break
        directive = DIRECTIVE_RE.fullmatch(stripped.rstrip(" \t"))
        if directive and directive.group(1).lower() == "escape":
            raise Refused("the escape parser directive must be the first line of the Dockerfile in the sandbox")
    continuation = re.compile(re.escape(escape) + r"[ \t]*$")
    doubled = re.compile(re.escape(escape) * 2 + r"[ \t]*$")

    def continued(line: str) -> tuple[str, bool]:
        if doubled.search(line):
            raise Refused("a Dockerfile line ends in a doubled escape character, which docker reads two ways")
        match = continuation.search(line)
        return (line[: match.start()], False) if match else (line, True)

    instructions: list[Instruction] = []
    index = 0
    while index < len(lines):
        line = lines[index].lstrip(" \t")
        start = index
        if line.startswith("#"):
            index += 1
            continue
        content, ended = continued(line)
        if ended and not content:
            index += 1
            continue
        parts = [content]
        while not ended and index + 1 < len(lines):
            index += 1
            raw = lines[index]
            if raw.lstrip(" \t").startswith("#") or not raw.strip(" \t"):
                continue
            content, ended = continued(raw)
            parts.append(content)
        instructions.append(_instruction(start, index, "".join(parts)))
        index += 1
    return Dockerfile(lines=lines, escape=escape, instructions=instructions)


def _instruction(start: int, end: int, line: str) -> Instruction:
    pieces = BLANKS_RE.split(line.strip(" \t"), maxsplit=1)
    word = pieces[0]
    if not re.fullmatch(r"[A-Za-z]+", word) or word.upper() not in INSTRUCTIONS:
        raise HttpError(400, f"Dockerfile parse error line {start + 1}: unknown instruction: {word.upper()}")
    flags, args = builder_flags(pieces[1]) if len(pieces) == 2 else ([], "")
    return Instruction(start=start, end=end, word=word.upper(), flags=tuple(flags), args=args.strip(" \t"))


def builder_flags(line: str) -> tuple[list[str], str]:
    """Docker's leading `--flag` words and the rest of the line. Docker reads this byte by byte, quotes and
    backslashes included, so it is done the same way here; a flag that is not plain ASCII is refused."""
    data = line.encode()
    words: list[bytes] = []
    word = bytearray()
    quote = 0
    blank_ok = False
    phase = "spaces"
    pos = 0
    while pos <= len(data):
        at_end = pos == len(data)
        ch = 0 if at_end else data[pos]
        if phase == "spaces":
            if at_end:
                break
            if ch in GO_BYTE_SPACES:
                pos += 1
                continue
            if ch != ord("-") or pos + 1 == len(data) or data[pos + 1] != ord("-"):
                return _flag_words(words), data[pos:].decode("utf-8", "replace")
            phase = "word"
        if at_end:
            if word != b"--" and (blank_ok or word):
                words.append(bytes(word))
            break
        if phase == "word":
            if ch in GO_BYTE_SPACES:
                phase = "spaces"
                if word == b"--":
                    return _flag_words(words), data[pos:].decode("utf-8", "replace")
                if blank_ok or word:
                    words.append(bytes(word))
                word, blank_ok = bytearray(), False
            elif ch in (ord("'"), ord('"')):
                quote, blank_ok, phase = ch, True, "quote"
            elif ch == ord("\\"):
                if pos + 1 < len(data):
                    pos += 1
                    word.append(data[pos])
            else:
                word.append(ch)
        elif ch == quote:
            phase = "word"
        elif ch == ord("\\"):
            if pos + 1 == len(data):
                phase = "word"
            else:
                pos += 1
                word.append(data[pos])
        else:
            word.append(ch)
        pos += 1
    return _flag_words(words), ""


def _flag_words(words: list[bytes]) -> list[str]:
    if any(not word.isascii() for word in words):
        raise Refused("a Dockerfile flag holds non-ASCII characters, which the sandbox refuses")
    return [word.decode() for word in words]


def _flag(instruction: Instruction, flag: str) -> tuple[str, str]:
    name, equals, value = flag.removeprefix("--").partition("=")
    if not equals:
        raise HttpError(400, f"Dockerfile parse error: missing a value on flag: {flag}")
    if not FLAG_VALUE_RE.fullmatch(value):
        raise Refused(f"the sandbox cannot check the {instruction.word} option {flag}: write it plainly")
    return name, value


def _stage_index(value: str) -> bool:
    """Docker takes COPY --from=N as a stage index when N parses as a 64-bit integer, else as an image."""
    return bool(STAGE_INDEX_RE.fullmatch(value)) and abs(int(value)) < 2**63


def mentions_reserved_label(text: str) -> bool:
    """Whether a LABEL's arguments could name a label in layercake's space once docker has removed its quotes
    and escapes (or expanded a variable)."""
    return LABEL_SPACE in QUOTES_AND_ESCAPES_RE.sub("", text).lower() or "$" in text


def add_sources(args: str) -> list[str]:
    """ADD's arguments as the engine may read them: a JSON array (escapes decoded; the engine's decoder reads
    the first JSON value and ignores what follows it) or words, and the text itself with its quotes and
    escapes gone, so that no spelling of a URL or variable goes unseen."""
    read = [args, QUOTES_AND_ESCAPES_RE.sub("", args)]
    if args.startswith("["):
        if "\\" in args:
            raise Refused("the sandbox cannot check ADD arguments written with JSON escapes: write them plainly")
        try:
            decoded, _end = json.JSONDecoder().raw_decode(args)
        except (ValueError, RecursionError):
            decoded = None
        if isinstance(decoded, list):
            read += [str(item) for item in decoded]
    return read


def go_duration(value: str) -> int:
    """A Go duration ("1m30s", "500ms", "0") in nanoseconds, as docker's flag parser reads it: one sign at
    most, each part truncated to whole nanoseconds."""
    if value in ("0", "+0", "-0", ""):
        return 0
    sign = -1 if value.startswith("-") else 1
    body = value[1:] if value[:1] in ("+", "-") else value
    if not re.fullmatch(f"(?:{GO_DURATION_PART_RE.pattern})+", body):
        raise HttpError(400, f"Dockerfile parse error: invalid duration {value!r}")
    total = 0
    for number, unit in GO_DURATION_PART_RE.findall(body):
        total += int(float(number) * DURATION_UNITS[unit])
    return sign * total


@dataclass
class DockerfilePlan:
    dockerfile: Dockerfile
    images: dict[int, str]
    copy_from: dict[int, str]
    # What its LABEL instructions add to the labels of the images they build on, at most.
    label_bytes: int = 0


def dockerfile_plan(text: str) -> DockerfilePlan:
    """Check a Dockerfile against the policy; return the images its FROM and COPY --from name."""
    if len(text) > DOCKERFILE_MAX:
        raise HttpError(400, f"the Dockerfile is too large for the sandbox (at most {DOCKERFILE_MAX // 1024} KB)")
    parsed = parse_dockerfile(text)
    # The classic builder knows a stage by its name only once the stage is over: within it, its own name is
    # an image's.
    stages: set[str] = set()
    current_stage = ""
    images: dict[int, str] = {}
    copy_from: dict[int, str] = {}
    for position, instruction in enumerate(parsed.instructions):
        word, args = instruction.word, instruction.args
        if word == "ONBUILD":
            raise not_available("ONBUILD in a Dockerfile")
        if word == "FROM":
            if current_stage:
                stages.add(current_stage)
            current_stage = ""
            for flag in instruction.flags:
                if _flag(instruction, flag)[0] != "platform":
                    raise not_available(f"the FROM option {flag.split('=')[0]}")
            words = BLANKS_RE.split(args) if args else []
            if not words:
                raise HttpError(400, "Dockerfile parse error: FROM requires an argument")
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                raise HttpError(400, "Dockerfile parse error: FROM requires either one or three arguments")
            image = words[0]
            if "$" in image:
                raise not_available("a variable in FROM")
            if not PLAIN_WORD_RE.fullmatch(image):
                raise Refused(f"the sandbox cannot check the image {image!r}: write it without quotes or escapes")
            if image.lower() not in stages and image != "scratch":
                images[position] = image
            if len(words) == 3:
                current_stage = words[2].lower()
                if not STAGE_NAME_RE.fullmatch(current_stage):
                    raise HttpError(400, f"invalid name for build stage: {words[2]!r}")
        elif word in ("ADD", "COPY"):
            for flag in instruction.flags:
                name, value = _flag(instruction, flag)
                if name == "from" and word == "COPY":
                    if not PLAIN_WORD_RE.fullmatch(value):
                        raise not_available("a variable in COPY --from")
                    if value.lower() not in stages and not _stage_index(value):
                        copy_from[position] = value
                elif name not in ("chown", "chmod"):
                    raise not_available(f"the {word} option --{name}")
            if word == "ADD" and any(
                "://" in source or "git@" in source or "$" in source for source in add_sources(args)
            ):
                raise not_available("ADD of a URL or of a variable source (the daemon would fetch it)")
        elif word == "HEALTHCHECK":
            for flag in instruction.flags:
                name, value = _flag(instruction, flag)
                if name not in ("interval", "timeout", "start-period", "retries"):
                    raise not_available(f"the HEALTHCHECK option --{name}")
                if name != "retries" and (go_duration(value) < 0 or 0 < go_duration(value) < SECOND):
                    raise Refused(f"HEALTHCHECK --{name} must be at least 1s in the sandbox")
        elif word == "LABEL" and mentions_reserved_label(" ".join([*instruction.flags, args])):
            raise Refused(f"labels starting with {LABEL_SPACE!r} are reserved by the sandbox")
    return DockerfilePlan(
        dockerfile=parsed,
        images=images,
        copy_from=copy_from,
        label_bytes=_label_text_size(parsed.instructions),
    )


def dockerfile_rewrite(plan: DockerfilePlan, resolved: Callable[[str], str]) -> str:
    """The Dockerfile with its images named as the engine knows them (the FROM --platform option dropped)."""
    replacements: dict[int, str] = {}
    for position, image in plan.images.items():
        words = BLANKS_RE.split(plan.dockerfile.instructions[position].args)
        words[0] = resolved(image)
        replacements[position] = "FROM " + " ".join(words)
    for position, image in plan.copy_from.items():
        instruction = plan.dockerfile.instructions[position]
        flags = []
        for flag in instruction.flags:
            name, value = _flag(instruction, flag)
            flags.append(f"--{name}={resolved(image) if name == 'from' else value}")
        replacements[position] = " ".join([instruction.word, *flags, instruction.args])
    return plan.dockerfile.rewrite(replacements)


# The builder replaces each variable an instruction names by its value (in ENV, ARG, EXPOSE, VOLUME, WORKDIR, USER
# and the others a shell does not read), and ENV and ARG values become variables in turn: a few lines that each
# name the last variable ten times made a 1 KB Dockerfile into a 2 MB configuration in minutes of the engine's
# time, and each line more makes ten times as much, of the memory the engine keeps for every image. An EXPOSE
# range is a port each in the configuration. Both are bounded by what they could make at most.
CONFIGURATION_GROWTH_MAX = DOCKERFILE_MAX
# What a variable that the instructions do not set may hold: the base image's, a build argument, or what the
# builder sets itself (PATH, HOME).
BUILDER_VARIABLE_BYTES = 256
UNEXPANDED_INSTRUCTIONS = frozenset(["RUN", "CMD", "ENTRYPOINT", "HEALTHCHECK", "SHELL", "MAINTAINER"])
EXPOSED_PORT_BYTES = 16


def _volume_count(args: str) -> int:
    """VOLUME's paths, as many as either of the engine's readings (a JSON array, or words) could make."""
    words = len(args.split())
    try:
        decoded = bounded_json(args) if args.startswith("[") else None
    except ValueError:
        decoded = None
    return max(words, len(decoded) if isinstance(decoded, list) else 0)


VARIABLE_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
VARIABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLAIN_VALUE_RE = re.compile(r"[^$\"'\\`]*")
ANY_PORT = 65535


def _port_number(text: str) -> int | None:
    """A port as the engine reads it (Go's ParseUint of 16 bits: any number of leading zeros)."""
    digits = text.lstrip("0") or ("0" if text else "")
    if not digits.isascii() or not digits.isdigit() or len(digits) > 5 or int(digits) > ANY_PORT:
        return None
    return int(digits)


def _exposed_ports(args: str, value: Callable[[str], str | None]) -> int:
    """How many ports an EXPOSE names, its variables taken at the values they are known to have; one of
    unknown value, a word with quotes or escapes, or a range of numbers not read here, could name a range of
    every port. The engine reads each word as [IP:[HOSTPORT]:]PORT[-END][/PROTO] (the two first numbers of a range
    of more) and exposes each of the container's ports."""
    ports = 0

    def expanded(match: re.Match[str]) -> str:
        known = value(match.group(1) or match.group(2))
        return "$" if known is None else known

    for word in VARIABLE_RE.sub(expanded, args).split():
        if "$" in word or QUOTES_AND_ESCAPES_RE.search(word):
            return ANY_PORT
        span = word.rpartition(":")[2].partition("/")[0].split("-")
        if len(span) == 1:
            ports += 1
            continue
        first, last = _port_number(span[0]), _port_number(span[1])
        if first is None or last is None:
            return ANY_PORT
        ports += max(last - first + 1, 1)
    return ports


def _words(args: str) -> list[str] | None:
    """ENV's and ARG's words as the engine splits them (blanks outside quotes), or None where an escape or a
    variable in a name could make them other variables than they read as."""
    if "\\" in args or "`" in args:
        return None
    words: list[str] = []
    word, quote, started = "", "", False
    for char in args:
        if quote:
            word += char
            quote = "" if char == quote else quote
        elif char.isspace():
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + char, True
            quote = char if char in "\"'" else ""
    if started:
        words.append(word)
    return words


@dataclass
class _Variables:
    """What the builder expands a variable to in a stage: an ENV (the base image's, or the stage's) whatever
    the order of the lines, or else an ARG of the stage (a build argument, its default, or the default of the
    ARG of that name before the first FROM). None where that is not known."""

    env: dict[str, str | None]
    known: bool
    args: dict[str, str | None] = field(default_factory=dict)

    def value(self, name: str) -> str | None:
        if name in self.env or not self.known:
            return self.env.get(name)
        return self.args.get(name)

    def unknown(self) -> None:
        self.env, self.known, self.args = {}, False, {}

    def read(self, instruction: Instruction, build_args: dict[str, str], defaults: dict[str, str | None]) -> None:
        words = _words(instruction.args)
        if words is None:
            self.unknown()
            return
        if instruction.word == "ENV" and words and "=" not in words[0]:
            pairs = [(words[0], "=", instruction.args.partition(words[0])[2].strip())]
        else:
            pairs = [word.partition("=") for word in words]
        for name, equals, text in pairs:
            if not VARIABLE_NAME_RE.fullmatch(name):
                self.unknown()
                return
            value: str | None = text if PLAIN_VALUE_RE.fullmatch(text) else None
            if instruction.word == "ENV":
                self.env[name] = value
            elif name in build_args:
                self.args[name] = build_args[name] if PLAIN_VALUE_RE.fullmatch(build_args[name]) else None
            else:
                self.args[name] = value if equals else defaults.get(name, "")


def _environment(config: dict[str, Any]) -> dict[str, str | None]:
    return {name: value for name, _, value in (str(e).partition("=") for e in config.get("Env") or [])}


def configuration_growth(
    instructions: list[Instruction],
    *,
    bases: list[dict[str, Any]],
    outside: int = 0,
    build_args: dict[str, str] | None = None,
    stage_bases: Mapping[int, dict[str, Any]] | None = None,
) -> int:
    """At most how many bytes the instructions add to an image's configuration beyond their own text, on the
    given base configurations (and with variables from outside, build arguments, of at most `outside` bytes):
    each `$` is taken to name the largest variable there could be. Refused past the sandbox's bounds, as are
    more volumes than an image may have (`MAX_IMAGE_VOLUMES`)."""
    volumes = max((len(base.get("Volumes") or {}) for base in bases), default=0)
    largest = max(
        [outside, BUILDER_VARIABLE_BYTES, *(len(str(e)) for base in bases for e in base.get("Env") or [])]
    )
    growth = 0
    # The variables' values, where known: before any FROM, the base's environment when there is one base (a
    # commit); at each FROM, that of the image it names (`stage_bases`, by the FROM's position), of the stage it
    # names, or none (scratch).
    variables = _Variables(_environment(bases[0]) if len(bases) == 1 else {}, known=len(bases) == 1)
    defaults: dict[str, str | None] = {}
    stages: dict[str, _Variables] = {}
    stage = ""
    in_stage = not any(instruction.word == "FROM" for instruction in instructions)
    for position, instruction in enumerate(instructions):
        if instruction.word == "FROM":
            if stage:
                stages[stage] = variables
            words = instruction.args.split()
            image = words[0].lower() if words else ""
            stage = words[2].lower() if len(words) == 3 else ""
            if position in (stage_bases or {}):
                variables = _Variables(_environment((stage_bases or {})[position]), known=True)
            elif image in stages:
                variables = _Variables(dict(stages[image].env), known=stages[image].known)
            else:
                variables = _Variables({}, known=image == "scratch")
            in_stage = True
        if instruction.word in ("ARG", "ENV"):
            if in_stage:
                variables.read(instruction, build_args or {}, defaults)
            else:
                meta = _Variables({}, known=True)
                meta.read(instruction, build_args or {}, defaults)
                defaults.update(meta.args)
        if instruction.word == "VOLUME":
            volumes += _volume_count(instruction.args)
        if instruction.word == "EXPOSE":
            growth += EXPOSED_PORT_BYTES * _exposed_ports(instruction.args, variables.value)
        if instruction.word not in UNEXPANDED_INSTRUCTIONS:
            named = largest * sum(text.count("$") for text in (*instruction.flags, instruction.args))
            growth += named
            if instruction.word in ("ENV", "ARG"):
                largest = max(largest, len(instruction.args) + named)
        if growth > CONFIGURATION_GROWTH_MAX:
            raise Refused(
                f"the variables and EXPOSE ranges of a Dockerfile (or of --change) may add at most "
                f"{CONFIGURATION_GROWTH_MAX // 1024} KB to its image's configuration in the sandbox: name "
                "variables fewer times, or expose fewer ports"
            )
    if volumes > MAX_IMAGE_VOLUMES:
        raise Refused(
            f"an image in the sandbox may have at most {MAX_IMAGE_VOLUMES} volumes (its base's included)"
        )
    return growth


@dataclass
class BuildContext:
    dockerfile_name: str
    dockerfile_text: str
    member_name: str
    tar: bytes


def build_context_tar(context: bytes, *, limit: int) -> bytes:
    """The context as a plain tar. Docker accepts gzip, bzip2 and xz; they are expanded here, never beyond
    `limit`, since a small archive can expand without bound."""
    if context.startswith(b"\x1f\x8b"):
        return _expand_gzip(context, limit=limit)
    for magic, make in ((b"BZh", bz2.BZ2Decompressor), (b"\xfd7zXZ\x00", lzma.LZMADecompressor)):
        if context.startswith(magic):
            return _expand(context, make, limit=limit)
    return context


def _too_large(limit: int) -> HttpError:
    return HttpError(413, f"the build context expands beyond the sandbox's limit ({limit} bytes)")


def _expand_gzip(data: bytes, *, limit: int) -> bytes:
    out = bytearray()
    try:
        while data:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += decompressor.decompress(data, limit + 1 - len(out))
            if len(out) > limit or decompressor.unconsumed_tail:
                raise _too_large(limit)
            if not decompressor.eof:
                raise HttpError(400, "the build context is a truncated gzip archive")
            data = decompressor.unused_data
    except zlib.error as exc:
        raise HttpError(400, "the build context is not a valid gzip archive") from exc
    return bytes(out)


def _expand(data: bytes, make: Callable[[], Any], *, limit: int) -> bytes:
    out = bytearray()
    try:
        while data:
            decompressor = make()
            out += decompressor.decompress(data, max_length=limit + 1 - len(out))
            if len(out) > limit or (not decompressor.eof and not decompressor.needs_input):
                raise _too_large(limit)
            if not decompressor.eof:
                raise HttpError(400, "the build context is a truncated archive")
            data = decompressor.unused_data
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise HttpError(400, "the build context is not a valid compressed archive") from exc
    return bytes(out)


def build_context_dockerfile(context: bytes, dockerfile: str, *, limit: int) -> BuildContext:
    """Find the Dockerfile in a tar context (gzip, bzip2 or xz allowed, as docker allows them)."""
    plain = build_context_tar(context, limit=limit)
    wanted = posixpath.normpath(dockerfile or "Dockerfile").lstrip("/")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(plain), mode="r:")  # noqa: SIM115
    except tarfile.TarError as exc:
        raise HttpError(400, "the build context is not a tar archive") from exc
    with archive:
        members = {posixpath.normpath(m.name).lstrip("/"): m for m in archive.getmembers()}
        # The engine unpacks the context before reading the Dockerfile; a path through a symbolic link would
        # let a later member replace the Dockerfile checked here. A name is a link if any member of that name is
        # one (the engine unpacks them in order, and a later member of the name may be a file), and a hard link
        # to a symbolic link is another symbolic link once unpacked.
        links = {posixpath.normpath(m.name).lstrip("/") for m in archive.getmembers() if m.issym() or m.islnk()}
        for name in members:
            parts = name.split("/")
            if any("/".join(parts[:end]) in links for end in range(1, len(parts))):
                raise Refused(f"the build context holds a path through a symbolic link ({name}); copy the files")
        candidates = [wanted] if dockerfile else ["Dockerfile", "dockerfile"]
        for name in candidates:
            member = members.get(name)
            if member is None:
                continue
            if not member.isfile():
                raise not_available("a Dockerfile that is not a regular file")
            if member.size > DOCKERFILE_MAX:
                raise HttpError(
                    400, f"the Dockerfile is too large for the sandbox (at most {DOCKERFILE_MAX // 1024} KB)"
                )
            handle = archive.extractfile(member)
            assert handle is not None
            text = handle.read().decode("utf-8", "replace")
            return BuildContext(dockerfile_name=name, dockerfile_text=text, member_name=member.name, tar=plain)
    raise HttpError(
        500,
        f"Cannot locate specified Dockerfile: {dockerfile or 'Dockerfile'}",
    )


# A zstd stream: the engine reads it, the standard library cannot, so it is taken for an archive.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TAR_BLOCK = 512


def _tar_head(data: bytes) -> bytes | None:
    """The first block of a file as the engine reads it to tell whether ADD unpacks it: decompressed if it is
    compressed (gzip, bzip2, xz), b"" if it does not decompress, None if this cannot be told."""
    try:
        if data.startswith(b"\x1f\x8b"):
            return zlib.decompressobj(31).decompress(data, TAR_BLOCK)
        if data.startswith(b"BZh"):
            return bz2.BZ2Decompressor().decompress(data, max_length=TAR_BLOCK)
        if data.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor().decompress(data, max_length=TAR_BLOCK)
    except (zlib.error, OSError, EOFError, lzma.LZMAError):
        return b""
    if data.startswith(ZSTD_MAGIC):
        return None
    return data[:TAR_BLOCK]


def _unpacked_by_add(data: bytes) -> bool:
    """Whether the engine would unpack a file that ADD names: one whose (decompressed) start is a tar header."""
    head = _tar_head(data)
    if head is None:
        return True
    if len(head) < TAR_BLOCK:
        return False
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _go_glob(pattern: str) -> "re.Pattern[str] | None":
    """A pattern as Go's filepath.Match reads it (the engine's, for ADD sources), as a regular expression: `*`
    and `?` stop at a slash, `[^...]` is a negated class, a backslash escapes. None for a pattern Go would
    refuse. A negated class here matches a slash too, which can only make more names match."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        i += 1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\":
            if i == len(pattern):
                return None
            out.append(re.escape(pattern[i]))
            i += 1
        elif char == "[":
            negated = pattern[i : i + 1] == "^"
            i += negated
            ranges: list[str] = []
            while True:
                if i == len(pattern):
                    return None
                if pattern[i] == "]" and ranges:
                    i += 1
                    break
                ends = []
                for _ in range(2):
                    if i == len(pattern) or pattern[i] in "-]":
                        return None
                    if pattern[i] == "\\":
                        i += 1
                        if i == len(pattern):
                            return None
                    ends.append(pattern[i])
                    i += 1
                    if pattern[i : i + 1] != "-":
                        break
                    i += 1
                ranges.append("-".join(re.escape(end) for end in ends))
            out.append(f"[{'^' if negated else ''}{''.join(ranges)}]")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _add_words(args: str) -> set[str]:
    """Every source an ADD may name, however the engine reads its arguments (each decoded JSON item as it
    is, and each word of the text, with and without its quotes); its destination among them."""
    words = {word for text in add_sources(args) for word in text.split()}
    if args.startswith("["):
        try:
            decoded, _end = json.JSONDecoder().raw_decode(args)
        except (ValueError, RecursionError):
            decoded = None
        if isinstance(decoded, list):
            words |= {str(item) for item in decoded}
    return {posixpath.normpath(word.strip('[],"')).lstrip("/") for word in words if word.strip('[],"')}


def refuse_added_archives(instructions: list[Instruction], context: bytes) -> None:
    """ADD of an archive in the context has the engine unpack it itself, to whatever size it expands (a few MB
    of compressed zeros to many GB), on the disk every student shares, in one step that no container runs and
    no look can stop. Every word of an ADD is read as a source (which may be a pattern); each file of the
    context it names is looked at as the engine would, and a link it names (which the engine follows) is
    refused as it stands."""
    patterns = []
    for instruction in instructions:
        if instruction.word != "ADD":
            continue
        for word in _add_words(instruction.args):
            pattern = _go_glob(word)
            if pattern is None:
                raise Refused(f"the sandbox cannot read the ADD source {word!r}: write it plainly")
            patterns.append(pattern)
    if not patterns:
        return
    with tarfile.open(fileobj=io.BytesIO(context), mode="r:") as archive:
        for member in archive:
            name = posixpath.normpath(member.name).lstrip("/")
            if not any(pattern.match(name) for pattern in patterns):
                continue
            if member.issym() or member.islnk():
                raise Refused(
                    f"ADD of a link ({name}), which docker would follow, is not available in the Layercake "
                    "sandbox: ADD or COPY what it names"
                )
            handle = archive.extractfile(member) if member.isfile() else None
            if handle is not None and _unpacked_by_add(handle.read()):
                raise Refused(
                    f"ADD of an archive ({name}), which docker would unpack itself whatever it unpacks to, is not "
                    "available in the Layercake sandbox: COPY it, and unpack it in a RUN step (tar -xf)"
                )


def build_context_replace(context: bytes, *, member_name: str, text: str) -> bytes:
    out = io.BytesIO()
    data = text.encode()
    with (
        tarfile.open(fileobj=io.BytesIO(context), mode="r:") as source,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as target,
    ):
        for member in source.getmembers():
            if member.name == member_name:
                member.size = len(data)
                target.addfile(member, io.BytesIO(data))
            elif member.isfile():
                target.addfile(member, source.extractfile(member))
            else:
                target.addfile(member)
    return out.getvalue()
