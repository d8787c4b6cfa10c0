"""The sessions the gateway serves, kept in Redis so a restarted gateway serves them all again.

A hash `<namespace>:gateway:sessions` maps a session id to its JSON record; a notice on the pubsub channel
`<namespace>:gateway:control` ({"op": "open"|"close", "session_id": N}) makes the running gateway act at
once. The gateway also re-reads the hash periodically, so a notice lost while it was down changes nothing.
"""

import json
from dataclasses import asdict, dataclass

# What a session registered before sessions had a disk budget may keep on the engine's disk.
DISK_BUDGET_MB_DEFAULT = 1024


@dataclass(frozen=True)
class SessionRecord:
    session_id: int
    owner_key: str
    expires_at: int
    memory_budget_mb: int
    max_containers: int
    disk_budget_mb: int = DISK_BUDGET_MB_DEFAULT

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, raw: str | bytes) -> "SessionRecord":
        data = json.loads(raw)
        return cls(
            session_id=int(data["session_id"]),
            owner_key=str(data["owner_key"]),
            expires_at=int(data["expires_at"]),
            memory_budget_mb=int(data["memory_budget_mb"]),
            max_containers=int(data["max_containers"]),
            disk_budget_mb=int(data.get("disk_budget_mb", DISK_BUDGET_MB_DEFAULT)),
        )
