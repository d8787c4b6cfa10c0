"""Settings shared by every environment. Every value can be set from the environment; the defaults run the
whole site on one machine (SQLite, a local Redis, the local Docker engine)."""

from pathlib import Path

from .env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = Path(env_str("LAYERCAKE_DATA_DIR", str(BASE_DIR / "var")))

DEVELOPMENT_KEY = "layercake-local-development-key-not-for-production"
# Keys anyone can read (this default, the placeholder of .env.example): never for a site others can reach.
PUBLIC_KEYS = {DEVELOPMENT_KEY, "change-me"}
SECRET_KEY = env_str("LAYERCAKE_SECRET_KEY", DEVELOPMENT_KEY)
DEBUG = env_bool("LAYERCAKE_DEBUG", False)
ALLOWED_HOSTS = env_list("LAYERCAKE_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("LAYERCAKE_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "lessons",
    "sandbox",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tutorial.urls"
ASGI_APPLICATION = "tutorial.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": env_str("LAYERCAKE_DB_ENGINE", "django.db.backends.sqlite3"),
        "NAME": env_str("LAYERCAKE_DB_NAME", str(DATA_DIR / "layercake.sqlite3")),
        "USER": env_str("LAYERCAKE_DB_USER", ""),
        "PASSWORD": env_str("LAYERCAKE_DB_PASSWORD", ""),
        "HOST": env_str("LAYERCAKE_DB_HOST", ""),
        "PORT": env_str("LAYERCAKE_DB_PORT", ""),
        # The web process and the workers share one SQLite file: wait for a lock rather than fail, and take the
        # write lock when a transaction begins, so that a check and the write it allows are one step.
        "OPTIONS": (
            {"timeout": 20, "transaction_mode": "IMMEDIATE"}
            if "sqlite" in env_str("LAYERCAKE_DB_ENGINE", "sqlite3")
            else {}
        ),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("LAYERCAKE_STATIC_ROOT", str(BASE_DIR / "staticfiles")))
# Front-end libraries come from Debian's packages (libjs-xterm, libjs-htmx), served under /static/vendor/.
JAVASCRIPT_DIR = Path(env_str("LAYERCAKE_JAVASCRIPT_DIR", "/usr/share/javascript"))
STATICFILES_DIRS = [BASE_DIR / "static", ("vendor", JAVASCRIPT_DIR)]

# Names and labels of everything this site creates on the engine start with the namespace, so two sites (or a
# test run beside a running site) can share one engine and one Redis without touching each other's sandboxes.
SANDBOX_NAMESPACE = env_str("LAYERCAKE_SANDBOX_NAMESPACE", "layercake")

REDIS_URL = env_str("LAYERCAKE_REDIS_URL", "redis://127.0.0.1:6391/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{SANDBOX_NAMESPACE}:channels"},
    }
}

CELERY_BROKER_URL = env_str("LAYERCAKE_CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_DEFAULT_QUEUE = SANDBOX_NAMESPACE
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 120
CELERY_TASK_TIME_LIMIT = 150
# Longer than any task's hard limit, so an unacknowledged task is never handed out twice while it still runs.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
# The reaper ends a sandbox at its first run past one of its deadlines: up to this long after it.
SANDBOX_REAP_INTERVAL = env_int("LAYERCAKE_REAP_INTERVAL", 20)
CELERY_BEAT_SCHEDULE = {
    "sandbox-reap": {
        "task": "sandbox.tasks.sandbox_reap_task",
        "schedule": float(SANDBOX_REAP_INTERVAL),
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# The sandbox runtime.
SANDBOX_BACKEND = env_str("LAYERCAKE_SANDBOX_BACKEND", "sandbox.backends.docker.DockerBackend")
SANDBOX_DOCKER_URL = env_str("LAYERCAKE_DOCKER_URL", "unix:///var/run/docker.sock")
SANDBOX_IMAGE = env_str("LAYERCAKE_SANDBOX_IMAGE", "layercake/workstation:latest")
SANDBOX_IDLE_TIMEOUT = env_int("LAYERCAKE_SANDBOX_IDLE_TIMEOUT", 15 * 60)
SANDBOX_MAX_AGE = env_int("LAYERCAKE_SANDBOX_MAX_AGE", 60 * 60)
# How long before each of those ends a sandbox the lesson page says so: typing puts off the idle timeout, and
# nothing the maximum age.
SANDBOX_IDLE_WARNING_LEAD = env_int("LAYERCAKE_SANDBOX_IDLE_WARNING_LEAD", 2 * 60)
SANDBOX_MAX_AGE_WARNING_LEAD = env_int("LAYERCAKE_SANDBOX_MAX_AGE_WARNING_LEAD", 5 * 60)
SANDBOX_CAPACITY = env_int("LAYERCAKE_SANDBOX_CAPACITY", 24)
# Live sandboxes one owner may hold at once, across lessons: one student cannot fill the host.
SANDBOX_PER_OWNER = env_int("LAYERCAKE_SANDBOX_PER_OWNER", 2)
# A workshop room behind one address needs as many as it has students: raise it for the workshop.
SANDBOX_PER_NETWORK = env_int("LAYERCAKE_SANDBOX_PER_NETWORK", 12)
SANDBOX_MEMORY_MB = env_int("LAYERCAKE_SANDBOX_MEMORY_MB", 256)
# The sandbox's own files (its user's home; /tmp and /var/tmp take a quarter of it each) are held in its
# memory, out of that above: its root file system is read-only, and it writes nothing to the engine's disk.
SANDBOX_FILES_MB = env_int("LAYERCAKE_SANDBOX_FILES_MB", 64)
SANDBOX_CPU_MILLI = env_int("LAYERCAKE_SANDBOX_CPU_MILLI", 500)
SANDBOX_PIDS_LIMIT = env_int("LAYERCAKE_SANDBOX_PIDS_LIMIT", 256)
SANDBOX_START_TIMEOUT = env_int("LAYERCAKE_SANDBOX_START_TIMEOUT", 60)

# The terminal: bytes of output kept per session for resume, and bytes in flight to a browser before the
# server stops reading from the container.
TERMINAL_REPLAY_BYTES = env_int("LAYERCAKE_TERMINAL_REPLAY_BYTES", 512 * 1024)
TERMINAL_WINDOW_BYTES = env_int("LAYERCAKE_TERMINAL_WINDOW_BYTES", 256 * 1024)
TERMINAL_MAX_FRAME_BYTES = env_int("LAYERCAKE_TERMINAL_MAX_FRAME_BYTES", 64 * 1024)
TERMINAL_ACTIVITY_WRITE_INTERVAL = env_int("LAYERCAKE_TERMINAL_ACTIVITY_WRITE_INTERVAL", 30)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LAYERCAKE_LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}

# The ASGI server serves /static/ itself unless a front proxy does it.
SERVE_STATIC = env_bool("LAYERCAKE_SERVE_STATIC", True)
# What one student's own containers may use inside a workstation session, through the gateway.
SANDBOX_STUDENT_MAX_CONTAINERS = env_int("LAYERCAKE_SANDBOX_STUDENT_MAX_CONTAINERS", 8)
SANDBOX_STUDENT_MEMORY_MB = env_int("LAYERCAKE_SANDBOX_STUDENT_MEMORY_MB", 512)
# What a student's containers, build steps, own images and volumes may keep on the engine's disk.
SANDBOX_STUDENT_DISK_MB = env_int("LAYERCAKE_SANDBOX_STUDENT_DISK_MB", 1024)
GATEWAY_DIR = Path(env_str("LAYERCAKE_GATEWAY_DIR", str(DATA_DIR / "gateway")))
# The gateway: who may connect to a session's socket (the workstation's student), request size caps, and the
# limits forced on every container a student creates.
GATEWAY_SOCKET_UID = env_int("LAYERCAKE_GATEWAY_SOCKET_UID", 1000)
GATEWAY_SOCKET_GID = env_int("LAYERCAKE_GATEWAY_SOCKET_GID", 1000)
GATEWAY_JSON_BODY_MAX = env_int("LAYERCAKE_GATEWAY_JSON_BODY_MAX", 1024 * 1024)
GATEWAY_BUILD_CONTEXT_MAX = env_int("LAYERCAKE_GATEWAY_BUILD_CONTEXT_MAX", 32 * 1024 * 1024)
GATEWAY_CONTAINER_MEMORY_MAX_MB = env_int("LAYERCAKE_GATEWAY_CONTAINER_MEMORY_MAX_MB", 256)
GATEWAY_CONTAINER_CPU_MILLI = env_int("LAYERCAKE_GATEWAY_CONTAINER_CPU_MILLI", 500)
GATEWAY_CONTAINER_PIDS_MAX = env_int("LAYERCAKE_GATEWAY_CONTAINER_PIDS_MAX", 128)
GATEWAY_RESTART_RETRIES_MAX = env_int("LAYERCAKE_GATEWAY_RESTART_RETRIES_MAX", 5)
GATEWAY_SHM_MAX_MB = env_int("LAYERCAKE_GATEWAY_SHM_MAX_MB", 64)
# The image of the small containers that carry a student's published ports into their workstation (it needs
# socat); the workstation's own image by default.
GATEWAY_FORWARDER_IMAGE = env_str("LAYERCAKE_GATEWAY_FORWARDER_IMAGE", "layercake/workstation:latest")
