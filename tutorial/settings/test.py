import os

from .base import *  # noqa: F403
from .base import DATA_DIR
from .env import env_str

# One namespace per test run: a test run never touches a running site's sandboxes, nor another run's, and
# has a database file of its own.
SANDBOX_NAMESPACE = env_str("LAYERCAKE_SANDBOX_NAMESPACE", f"lctest{os.getpid()}")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / f"{SANDBOX_NAMESPACE}.sqlite3"),
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        "TEST": {"NAME": str(DATA_DIR / f"{SANDBOX_NAMESPACE}-db.sqlite3")},
    }
}
REDIS_URL = env_str("LAYERCAKE_TEST_REDIS_URL", "redis://127.0.0.1:6391/5")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{SANDBOX_NAMESPACE}:channels"},
    }
}
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = SANDBOX_NAMESPACE
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
GATEWAY_DIR = DATA_DIR / "test-gateway" / SANDBOX_NAMESPACE
SANDBOX_IDLE_TIMEOUT = 600
SANDBOX_MAX_AGE = 900
