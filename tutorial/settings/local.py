from .base import *  # noqa: F403
from .base import ALLOWED_HOSTS, PUBLIC_KEYS, SECRET_KEY
from .env import env_bool

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}

# A site that answers to any name but this machine's own is serving students: debug pages would show them the
# code and settings behind every error, and a public key lets them forge what the site signs.
SERVED_TO_OTHERS = not set(ALLOWED_HOSTS) <= LOOPBACK_HOSTS
DEBUG = env_bool("LAYERCAKE_DEBUG", not SERVED_TO_OTHERS)
if SERVED_TO_OTHERS and SECRET_KEY in PUBLIC_KEYS:
    raise RuntimeError(f"LAYERCAKE_SECRET_KEY must be set to a secret when the site answers to {ALLOWED_HOSTS}")
