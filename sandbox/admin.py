from django.contrib import admin

from .models import Sandbox


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin):
    list_display = ["pk", "owner_key", "lesson", "image", "state", "end_reason", "created_at", "expires_at"]
    list_filter = ["state", "end_reason"]
    readonly_fields = ["backend_state", "created_at", "ready_at", "ended_at"]
