"""Webhooks: endpoints an admin registers, emitted events, signed and logged delivery."""
