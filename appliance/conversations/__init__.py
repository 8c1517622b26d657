"""Conversations, their members and roles, and who may do what in them."""
