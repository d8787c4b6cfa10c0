from .base import *  # noqa: F403
from .base import ALLOWED_HOSTS, PUBLIC_KEYS, SECRET_KEY
from .env import env_bool, env_str

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}
LOOPBACK_ADDRESSES = {"127.0.0.1", "::1", "localhost"}

# A site that listens beyond this machine, or answers to any name but its own, is serving students: debug
# pages would show them the code and settings behind every error (any client can send `Host: localhost`),
# and a public key lets them forge what the site signs.
SERVED_TO_OTHERS = not set(ALLOWED_HOSTS) <= LOOPBACK_HOSTS or (
    env_str("LAYERCAKE_HOST", "127.0.0.1") not in LOOPBACK_ADDRESSES
)
DEBUG = env_bool("LAYERCAKE_DEBUG", not SERVED_TO_OTHERS)
if SERVED_TO_OTHERS and SECRET_KEY in PUBLIC_KEYS:
    raise RuntimeError(
        "LAYERCAKE_SECRET_KEY must be set to a secret when the site listens beyond this machine or answers to "
        f"{ALLOWED_HOSTS}"
    )
