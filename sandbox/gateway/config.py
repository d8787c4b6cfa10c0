"""The gateway's settings, read once when the gateway (or a client call) starts, never at import time."""

from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

API_VERSION = "1.41"
MIN_API_VERSION = (1, 24)


@dataclass(frozen=True)
class GatewayConfig:
    namespace: str
    gateway_dir: Path
    engine_socket: str
    redis_url: str
    socket_uid: int
    socket_gid: int
    json_body_max: int
    build_context_max: int
    container_memory_max_mb: int
    container_cpu_milli: int
    container_pids_max: int
    restart_retries_max: int
    shm_max_mb: int
    forwarder_image: str = ""

    @property
    def sessions_key(self) -> str:
        return f"{self.namespace}:gateway:sessions"

    @property
    def control_channel(self) -> str:
        return f"{self.namespace}:gateway:control"

    def events_channel(self, session_id: int) -> str:
        return f"{self.namespace}:events:{session_id}"

    def session_dir(self, session_id: int) -> Path:
        return self.gateway_dir / str(session_id)

    def session_socket(self, session_id: int) -> Path:
        return self.session_dir(session_id) / "docker.sock"

    def session_network(self, session_id: int) -> str:
        return f"{self.namespace}-sb-{session_id}"

    def workstation_name(self, session_id: int) -> str:
        """The launcher names the workstation container as it names the session network."""
        return f"{self.namespace}-sb-{session_id}"

    def ports_key(self, session_id: int) -> str:
        return f"{self.namespace}:gateway:ports:{session_id}"


def gateway_config() -> GatewayConfig:
    docker_url = str(getattr(settings, "SANDBOX_DOCKER_URL", "unix:///var/run/docker.sock"))
    if not docker_url.startswith("unix://"):
        raise ValueError("the gateway reaches the engine only through a unix socket (SANDBOX_DOCKER_URL)")
    return GatewayConfig(
        namespace=str(getattr(settings, "SANDBOX_NAMESPACE", "layercake")),
        gateway_dir=Path(getattr(settings, "GATEWAY_DIR", Path(settings.DATA_DIR) / "gateway")),
        engine_socket=docker_url.removeprefix("unix://"),
        redis_url=str(settings.REDIS_URL),
        socket_uid=int(getattr(settings, "GATEWAY_SOCKET_UID", 1000)),
        socket_gid=int(getattr(settings, "GATEWAY_SOCKET_GID", 1000)),
        json_body_max=int(getattr(settings, "GATEWAY_JSON_BODY_MAX", 1024 * 1024)),
        build_context_max=int(getattr(settings, "GATEWAY_BUILD_CONTEXT_MAX", 32 * 1024 * 1024)),
        container_memory_max_mb=int(getattr(settings, "GATEWAY_CONTAINER_MEMORY_MAX_MB", 256)),
        container_cpu_milli=int(getattr(settings, "GATEWAY_CONTAINER_CPU_MILLI", 500)),
        container_pids_max=int(getattr(settings, "GATEWAY_CONTAINER_PIDS_MAX", 128)),
        restart_retries_max=int(getattr(settings, "GATEWAY_RESTART_RETRIES_MAX", 5)),
        shm_max_mb=int(getattr(settings, "GATEWAY_SHM_MAX_MB", 64)),
        # Empty: the forwarders run the workstation's own image, which has socat.
        forwarder_image=str(getattr(settings, "GATEWAY_FORWARDER_IMAGE", "")),
    )
