from .base import *  # noqa: F403
from .base import PUBLIC_KEYS
from .env import env_bool, env_str

DEBUG = False
SECRET_KEY = env_str("LAYERCAKE_SECRET_KEY", "")
if not SECRET_KEY or SECRET_KEY in PUBLIC_KEYS:
    raise RuntimeError("LAYERCAKE_SECRET_KEY must be set to a secret in production")
SESSION_COOKIE_SECURE = env_bool("LAYERCAKE_SECURE_COOKIES", True)
CSRF_COOKIE_SECURE = env_bool("LAYERCAKE_SECURE_COOKIES", True)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
