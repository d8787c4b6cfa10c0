from django.conf import settings
from django.db import models
from django.urls import reverse


class SandboxState(models.TextChoices):
    QUEUED = "queued", "Queued"
    CREATING = "creating", "Creating"
    STARTING = "starting", "Starting"
    READY = "ready", "Ready"
    STOPPING = "stopping", "Stopping"
    ENDED = "ended", "Ended"
    FAILED = "failed", "Failed"


ACTIVE_STATES = (
    SandboxState.QUEUED,
    SandboxState.CREATING,
    SandboxState.STARTING,
    SandboxState.READY,
)


class EndReason(models.TextChoices):
    NONE = "", "—"
    STOPPED = "stopped", "You stopped the sandbox."
    IDLE = "idle", "The sandbox was idle for too long."
    MAX_AGE = "max_age", "The sandbox reached its maximum lifetime."
    EXITED = "exited", "The shell exited."
    VANISHED = "vanished", "The sandbox container is gone."
    ERROR = "error", "The sandbox could not be started."
    ENGINE_DOWN = "engine_down", "The container engine is not reachable right now."
    SHUTDOWN = "shutdown", "The site was stopped."


class SandboxQuerySet(models.QuerySet["Sandbox"]):
    def active(self) -> "SandboxQuerySet":
        return self.filter(state__in=ACTIVE_STATES)


class Sandbox(models.Model):
    owner_key = models.CharField(max_length=64, db_index=True, help_text="The browser session that owns it.")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    lesson = models.ForeignKey("lessons.Lesson", null=True, blank=True, on_delete=models.SET_NULL)
    client_network = models.CharField(
        max_length=64, blank=True, db_index=True, help_text="Where the request that started it came from."
    )
    image = models.CharField(max_length=200)
    state = models.CharField(max_length=16, choices=SandboxState.choices, default=SandboxState.QUEUED)
    end_reason = models.CharField(max_length=16, choices=EndReason.choices, default=EndReason.NONE, blank=True)
    message = models.CharField(max_length=500, blank=True)
    backend_state = models.JSONField(
        default=dict, blank=True, help_text="What the backend needs to find it again."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    last_activity_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    objects = SandboxQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "expires_at"])]

    def __str__(self) -> str:
        return f"sandbox {self.pk} ({self.state})"

    def get_absolute_url(self) -> str:
        return reverse("sandbox:panel", kwargs={"pk": self.pk})

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def terminal_path(self) -> str:
        return f"/ws/sandbox/{self.pk}/terminal/"
