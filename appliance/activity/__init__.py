"""The API activity log (who called which route, when, with what outcome)."""

from __future__ import annotations

from appliance.activity.log import ActivityLog, ActivityRecord

__all__ = ["ActivityLog", "ActivityRecord"]
