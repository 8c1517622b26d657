"""Realtime: one Redis pub/sub connection per api process, WebSockets, receipts and presence."""
